"""The DAE (experiments/dae.py) on IXI T2, the data of experiments/t2.py; fused with it by

    make train CONFIG=experiments/dae_t2.py ARGS="--config.data_root=... --config.splits_dir=..."
    make eval CONFIG=experiments/t2.py ARGS="... --config.eval.pixel_workdir=runs/dae_t2"

CPU smoke run: CONFIG=experiments/dae_t2.py:tiny.
"""

from experiments import base, dae, t2


def get_config(variant: str = ""):
    return dae.of_paper_config(t2, "dae_t2", variant)


sweep = base.five_folds
