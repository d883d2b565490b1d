"""The DAE (experiments/dae.py) on the 2 mm real T1 heads of experiments/t1_2mm.py, fused with that
Patch2Loc run by the real-data check (`make real-check`, data_prep/real_check_t1.py).

The default variant is the faithful DAE (width 64, 67,200 steps of 16 slices) for a GPU; `:cpu`
is what the check trains on 2 CPU cores; `:tiny` the tests' smoke form.
"""

from experiments import dae, t1_2mm


def get_config(variant: str = ""):
    if variant not in ("", "cpu", "tiny"):
        raise ValueError(f"unknown variant {variant!r} of experiments/dae_t1_2mm.py (cpu, tiny)")
    c = dae.as_dae(t1_2mm.get_config(variant), "dae_t1_2mm")
    c.eval.uncertainty_report = False  # Patch2Loc's variance head; the DAE has none
    if variant == "tiny":
        return dae.tiny(c)
    if variant == "cpu":
        # What the check trains on 2 CPU cores in about a quarter of an hour: width 16 (1/16 of
        # the faithful U-Net's arithmetic), 600 steps.
        c = dae.for_cpu(c, width=16, steps=600)
        c.checkpoint_every = 200
    return c
