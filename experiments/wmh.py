"""Patch2Loc on WMH (T1): IXI T1 training fold `fold`, evaluation on WMH (spec §1, §3.3).

Reproduces the paper's WMH column (Dice per threshold policy, AUPRC, AUROC; mean ± std over
folds 0-4). Command (one fold):

    make train CONFIG=experiments/wmh.py \
        ARGS="--config.data_root=/data/p2l --config.splits_dir=/data/splits"

Hardware: one GPU, 15,000 steps of ~11.5 k valid patches.
CPU smoke run: CONFIG=experiments/wmh.py:tiny.
"""

from experiments import base


def get_config(variant: str = ""):
    c = base.base_config()
    c.name = "wmh"
    c.modality = "t1"
    c.test_sets = ("WMH",)
    if variant == "tiny":
        c = base.tiny(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of experiments/wmh.py (known: 'tiny')")
    return c


def sweep():
    """The paper's protocol: 5 IXI folds (spec §1.1, §8.3), one seed. Add seeds for variance."""
    return [{"fold": fold, "seed": 3141} for fold in range(5)]
