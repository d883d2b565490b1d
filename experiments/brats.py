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
    return base.paper_config("brats", "t2", ("Brats21",), variant)


sweep = base.five_folds
