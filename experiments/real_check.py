"""Config of the real-data check: train briefly on the one real healthy scan we have (IXI002 T2),
detect on real lesions (MSLUB T2, BraTS 2015 FLAIR).

The inputs are prepared and the check is run by data_prep/real_check.py:

    .venv/bin/python -m data_prep.real_check --shared ../shared --workdir runs/real_check
"""

from experiments import base


def get_config(variant: str = ""):
    c = base.base_config()
    c.name = "real_check"
    c.modality = "t2"
    c.test_sets = ("MSLUB", "BraTS15")
    c.sampling.slices_per_step = 1  # one training subject: one slice per step (spec §3.3)
    c.sampling.num_candidates = 1024
    # 600 steps, not fewer: at 150 the location error was still ~70 px RMS (the model had barely
    # started to localise) and whether lesions out-scored the rest of the brain in BraTS was
    # decided by float rounding (5 of 6 cases with one XLA:CPU conv backend, 3 of 6 with the
    # other). At 600 they were positive in all 6 cases, 0.13-1.49, for seeds 3141 and 1 and for
    # both conv backends (about 9 minutes on 2 CPU cores).
    c.num_steps = 600
    c.log_every = 50
    c.eval_every = 100
    c.checkpoint_every = 200
    c.optim.learning_rate = 1e-3  # lr 1e-2 is tuned for 356-slice batches; 1 slice is noisier
    c.eval.stride = 8
    c.eval.batch_size = 2048
    c.eval.num_figures = 6
    c.eval.healthy_split = "val"
    if variant:
        raise ValueError(f"unknown variant {variant!r} of experiments/real_check.py")
    return c
