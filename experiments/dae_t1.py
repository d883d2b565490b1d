"""The DAE (experiments/dae.py) on IXI T1, the data of experiments/t1.py; fused with it by

    make train CONFIG=experiments/dae_t1.py ARGS="--config.data_root=... --config.splits_dir=..."
    make eval CONFIG=experiments/t1.py ARGS="... --config.eval.pixel_workdir=runs/dae_t1"

CPU smoke run: CONFIG=experiments/dae_t1.py:tiny.
"""

from experiments import base, dae, t1


def get_config(variant: str = ""):
    return dae.of_paper_config(t1, "dae_t1", variant)


sweep = base.five_folds
