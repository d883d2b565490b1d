"""The DAE (experiments/dae.py) on IXI T2, the data of experiments/t2.py; fused with it by

    make train CONFIG=experiments/dae_t2.py ARGS="--config.data_root=... --config.splits_dir=..."
    make eval CONFIG=experiments/t2.py ARGS="... --config.eval.pixel_workdir=runs/dae_t2"

CPU smoke run: CONFIG=experiments/dae_t2.py:tiny.
"""

from experiments import base, dae, t2


def get_config(variant: str = ""):
    if variant not in ("", "tiny"):
        raise ValueError(f"unknown variant {variant!r} of experiments/dae_t2.py (known: 'tiny')")
    c = dae.as_dae(t2.get_config(variant), "dae_t2")
    return dae.tiny(c) if variant == "tiny" else c


sweep = base.five_folds
