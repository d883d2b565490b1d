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
    return base.paper_config("wmh", "t1", ("WMH",), variant)


sweep = base.five_folds
