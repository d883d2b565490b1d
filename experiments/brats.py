"""Patch2Loc on BraTS21 (T2): IXI T2 training fold `fold`, evaluation on Brats21 (spec §1, §3.3).

Reproduces the paper's Brats21 column (Dice per threshold policy, AUPRC, AUROC; mean ± std over
folds 0-4). Command (one fold):

    make train CONFIG=experiments/brats.py \
        ARGS="--config.data_root=/data/p2l --config.splits_dir=/data/splits"

Hardware: one GPU, 15,000 steps of ~11.5 k valid patches.
CPU smoke run: CONFIG=experiments/brats.py:tiny.
"""

from experiments import base


def get_config(variant: str = ""):
    c = base.base_config()
    c.name = "brats"
    c.modality = "t2"
    c.test_sets = ("Brats21",)
    if variant == "tiny":
        c = base.tiny(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of experiments/brats.py (known: 'tiny')")
    return c


def sweep():
    """The paper's protocol: 5 IXI folds (spec §1.1, §8.3), one seed. Add seeds for variance."""
    return [{"fold": fold, "seed": 3141} for fold in range(5)]
