"""Patch2Loc on ATLAS v2 (T1): IXI T1 training fold `fold`, evaluation on ATLAS_v2 (spec §1, §3.3).

Reproduces the paper's ATLAS_v2 column (Dice per threshold policy, AUPRC, AUROC; mean ± std over
folds 0-4). Command (one fold):

    make train CONFIG=experiments/atlas.py \
        ARGS="--config.data_root=/data/p2l --config.splits_dir=/data/splits"

Hardware: one GPU, 15,000 steps of ~11.5 k valid patches.
CPU smoke run: CONFIG=experiments/atlas.py:tiny.
"""

from experiments import base


def get_config(variant: str = ""):
    c = base.base_config()
    c.name = "atlas"
    c.modality = "t1"
    c.test_sets = ("ATLAS_v2",)
    if variant == "tiny":
        c = base.tiny(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of experiments/atlas.py (known: 'tiny')")
    return c


def sweep():
    """The paper's protocol: 5 IXI folds (spec §1.1, §8.3), one seed. Add seeds for variance."""
    return [{"fold": fold, "seed": 3141} for fold in range(5)]
