"""Patch2Loc T1: one model per IXI T1 fold, evaluated on ATLAS v2 and WMH (spec §1, §3.3).

The T1 counterpart of t2.py: `atlas.py` and `wmh.py` are this config and share its run folder
(`runs/t1`), so one T1 model per fold gives both columns. Command (one fold):

    make train CONFIG=experiments/t1.py \
        ARGS="--config.data_root=/data/p2l --config.splits_dir=/data/splits"

Hardware: one GPU, 15,000 steps of ~11.5 k valid patches.
CPU smoke run: CONFIG=experiments/t1.py:tiny.
"""

from experiments import base


def get_config(variant: str = ""):
    return base.paper_config("t1", "t1", ("ATLAS_v2", "WMH"), variant)


sweep = base.five_folds
