"""The denoising autoencoder (DAE) of Kascenas, Pugeault & O'Neil (MIDL 2022) on the data of a
Patch2Loc config: the pixel-wise detector Patch2Loc is fused with (p2l.fusion, README "Fusion").

`as_dae(config)` turns a Patch2Loc config into the DAE trained on the same healthy slices: the same
tfds builds, load-time normalisation and slice feed (one step = `sampling.slices_per_step` whole
slices), the same mesh, checkpoints, resume, sweeps and evaluation. Only `method`, `dae.*` and the
optimiser differ. Their BraTS setting (AntanasKascenas/DenoisingAE, `denoising.py`), and ours:

| | Kascenas et al. | p2l default |
|---|---|---|
| network | U-Net, depth 4, wf 6 (widths 64-512); blocks of reflection pad, weight- | the same |
| | standardised 3x3 conv, Swish, GroupNorm; avg-pool down, up-conv up | (`p2l.dae_model`) |
| noise | N(0, 0.2) on 16x16, bilinear up, random roll, on the foreground (x > 0.01) | the same, a |
| | | roll per slice |
| loss | mean of (x_hat - x)^2 x mask over all pixels | the same |
| optimiser | Adam(amsgrad) 1e-4, weight decay 1e-5 | the same |
| schedule | CosineAnnealingLR(T_max=100 epochs of 32 steps) | cosine 1e-4 -> 0 over the run |
| batch, steps | 16 slices, 2,100 x 32 = 67,200 steps | 16 slices, 67,200 steps |
| input | 128x128 BraTS slices, 4 modalities | the Patch2Loc config's slices, 1 modality |
| score | abs(x - x_hat) in an eroded mask, 5x5 2-D median | abs(x - x_hat) in the brain, then the |
| | | Patch2Loc post-processing (7x7x7 median, mask) |
"""

from __future__ import annotations

import ml_collections


def as_dae(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The DAE on `c`'s data and geometry (the faithful settings above)."""
    c.name = name
    c.method = "dae"
    c.dae = ml_collections.ConfigDict()
    c.dae.depth = 4
    c.dae.width = 64
    c.dae.noise_std = 0.2
    c.dae.noise_res = 16
    c.dae.eval_slices = 32  # slices per inference forward (per device)
    c.sampling.slices_per_step = 16
    c.num_steps = 67200
    c.optim.learning_rate = 1e-4
    c.optim.decay_steps = c.num_steps
    c.optim.weight_decay = 1e-5
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 2000
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A CPU smoke run of the DAE: a narrow U-Net, a few steps."""
    c.dae.width = 8
    c.sampling.slices_per_step = 4
    c.num_steps = 12
    c.optim.decay_steps = 12
    c.log_every = 4
    c.eval_every = 6
    c.checkpoint_every = 6
    c.eval.max_volumes = 2
    c.eval.max_healthy_volumes = 2
    return c


def for_cpu(c: ml_collections.ConfigDict, width: int, steps: int) -> ml_collections.ConfigDict:
    """A narrower, shorter DAE that 2 CPU cores train in minutes: `width`, `steps` steps of 16
    slices at 1e-3 (their code's default rate; 1e-4 is for their 67,200 steps), cosine to 0."""
    c.dae.width = width
    c.num_steps = steps
    c.optim.decay_steps = steps
    c.optim.learning_rate = 1e-3
    c.log_every = 50
    c.eval_every = 100
    return c


def of_paper_config(module, name: str, variant: str = "") -> ml_collections.ConfigDict:
    """The DAE on the data of a paper config module (experiments/t1.py, t2.py), `:tiny` too."""
    if variant not in ("", "tiny"):
        raise ValueError(f"unknown variant {variant!r} of experiments/{name}.py (known: 'tiny')")
    c = as_dae(module.get_config(variant), name)
    return tiny(c) if variant == "tiny" else c
