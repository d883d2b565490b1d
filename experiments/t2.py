"""Patch2Loc T2: one model per IXI T2 fold, evaluated on BraTS21 and MSLUB (spec §1, §3.3).

The reference trains one T2 model per fold and tests it on both T2 lesion sets (and one T1 model
on ATLAS v2 and WMH: t1.py), so the paper's Brats21 and MSLUB columns come from the same model.
`brats.py` and `mslub.py` are this config: `make train CONFIG=experiments/brats.py` and
`make train CONFIG=experiments/mslub.py` use the same run folder (`runs/t2`, named after
`config.name`), so the second finds the model trained instead of training another, and
`make eval` evaluates it on both sets. Command (one fold):

    make train CONFIG=experiments/t2.py \
        ARGS="--config.data_root=/data/p2l --config.splits_dir=/data/splits"

Hardware: one GPU, 15,000 steps of ~11.5 k valid patches. Without one of the lesion sets:
ARGS="... --config.test_sets='(\"MSLUB\",)'" (test_sets is not part of the run's identity).
CPU smoke run: CONFIG=experiments/t2.py:tiny.
"""

from experiments import base


def get_config(variant: str = ""):
    return base.paper_config("t2", "t2", ("Brats21", "MSLUB"), variant)


sweep = base.five_folds
