"""The embedded default: Patch2Loc on synthetic data derived from nilearn's MNI152 template.

No download and no GPU. `make demo` writes the data (data_prep.demo_data) into runs/demo/data,
trains this config, computes heatmaps on the synthetic-lesion volumes and prints the metrics. The
numbers only show that the pipeline runs end to end; they are not the paper's.

The demo volumes are 2 mm isotropic, so the evaluation grid is 96x96x48 and patches are
int(0.125*96) = 12 px; everything else is the reference's code path.
"""

from experiments import base


def get_config(variant: str = ""):
    c = base.base_config()
    c.name = "demo"
    c.modality = "t2"
    c.data_root = "runs/demo/data/data"
    c.splits_dir = "runs/demo/data/splits"
    c.test_sets = ("Synth",)
    c.data.image_shape = (96, 96, 48)
    c.data.expected_spacing = 2.0
    c.sampling.slices_per_step = 16
    c.sampling.num_candidates = 2048
    # The 2 mm brain fills more of its 96x96 slice than a 1 mm brain fills 192x192: ~55 % of
    # candidates are accepted, so the static buffer is larger than the default 0.6.
    c.sampling.capacity_fraction = 0.8
    c.num_steps = 300
    c.log_every = 25
    c.eval_every = 50
    c.checkpoint_every = 100
    c.eval.stride = 2
    c.eval.batch_size = 2048
    if variant == "tiny":
        c.num_steps = 12
        c.log_every = 4
        c.eval_every = 6
        c.checkpoint_every = 6
        c.sampling.slices_per_step = 8
        c.sampling.num_candidates = 512
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of experiments/demo.py (known: 'tiny')")
    return c


def sweep():
    """A small sweep for CPU: 2 folds x 2 seeds, each a short run (make sweep CONFIG=this)."""
    short = {"num_steps": 40, "checkpoint_every": 20, "eval_every": 20, "log_every": 10,
             "eval.stride": 4, "eval.max_volumes": 2, "eval.max_healthy_volumes": 2}  # fmt: skip
    return [{"fold": f, "seed": s, **short} for f in (0, 1) for s in (0, 1)]
