"""Patch2Loc on MSLUB (T2): IXI T2 training fold `fold`, evaluation on MSLUB (spec §1, §3.3).

Reproduces the paper's MSLUB column (Dice per threshold policy, AUPRC, AUROC; mean ± std over
folds 0-4). Command (one fold):

    make train CONFIG=experiments/mslub.py \
        ARGS="--config.data_root=/data/p2l --config.splits_dir=/data/splits"

Hardware: one GPU, 15,000 steps of ~11.5 k valid patches.
CPU smoke run: CONFIG=experiments/mslub.py:tiny.
"""

from experiments import base


def get_config(variant: str = ""):
    return base.paper_config("mslub", "t2", ("MSLUB",), variant)


sweep = base.five_folds
