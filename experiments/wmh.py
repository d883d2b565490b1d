"""The paper's WMH column: the T1 run of experiments/t1.py (one T1 model per fold, evaluated on
ATLAS v2 and WMH, as the reference; spec §1).

    make train CONFIG=experiments/wmh.py \
        ARGS="--config.data_root=/data/p2l --config.splits_dir=/data/splits"

trains that fold's T1 model in runs/t1, or, when it is trained already (by t1.py or its other
column's config), says so instead of training
another; `make eval` evaluates it on both sets. CPU smoke run: CONFIG=experiments/wmh.py:tiny.
"""

from experiments.t1 import get_config, sweep

__all__ = ["get_config", "sweep"]
