"""The paper's MSLUB column: the T2 run of experiments/t2.py (one T2 model per fold, evaluated on
BraTS21 and MSLUB, as the reference; spec §1).

    make train CONFIG=experiments/mslub.py \
        ARGS="--config.data_root=/data/p2l --config.splits_dir=/data/splits"

trains that fold's T2 model in runs/t2, or, when it is trained already (by t2.py or its other
column's config), says so instead of training
another; `make eval` evaluates it on both sets. CPU smoke run: CONFIG=experiments/mslub.py:tiny.
"""

from experiments.t2 import get_config, sweep

__all__ = ["get_config", "sweep"]
