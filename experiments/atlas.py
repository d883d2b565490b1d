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
    return base.paper_config("atlas", "t1", ("ATLAS_v2",), variant)


sweep = base.five_folds
