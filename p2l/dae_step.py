"""The denoising autoencoder's training side: optimiser, state, loss, jitted steps, inference.

Mirrors `p2l.train`'s conventions: pure steps (state, batch, key) -> (state, metrics), jitted over
a ('data',) mesh with the batch sharded and the state replicated; a non-finite step leaves the
state untouched (`p2l.train_state.keep_if_finite`). The batch is the slice batch of `p2l.train`
("image" (B, H, W) float32, "mask_one", "position", "slice_index"; only "image" is read), zero
rows padding it to a multiple of the device count.

As Kascenas et al. (MIDL 2022) train their BraTS model: the slice plus coarse noise on its
foreground (`p2l.dae_noise`) is reconstructed, loss the squared error on the foreground averaged
over all pixels of the real slices; Adam with AMSGrad and coupled L2 weight decay (PyTorch's
`Adam(amsgrad=True, weight_decay=...)`, `scale_by_torch_amsgrad`) and a cosine learning rate.

The mask of the noise and of the loss is theirs, the slice's own foreground, image > 0.01
(`foreground`), not the brain mask "mask_one": our images are 0 outside the brain after the
load-time normalisation (p2l.normalization), so the foreground is the brain minus its darkest
voxels, which get neither noise nor loss, as in their code. The zero rows padding
the batch have no foreground, so they stay out of both.

Imports no TensorFlow and not `p2l.train`, so inference (`make_reconstruct`, p2l.dae_scoring)
stays light.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from p2l import dae_noise, parallel
from p2l.dae_model import init_dae_variables
from p2l.heatmaps import positive_int
from p2l.losses import weighted_mean
from p2l.train_state import TrainState, apply_step

# torch.optim.Adam's defaults, which the reference keeps.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
# Their foreground: pixels whose intensity (summed over channels; one here) exceeds this.
FOREGROUND_THRESHOLD = 0.01


class TorchAmsgradState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def scale_by_torch_amsgrad(
    b1: float = ADAM_B1, b2: float = ADAM_B2, eps: float = ADAM_EPS
) -> optax.GradientTransformation:
    """PyTorch's Adam(amsgrad=True) step direction (before the learning rate):

        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  v_max = max(v_max, v)
        update = (m / (1 - b1^t)) / (sqrt(v_max) / sqrt(1 - b2^t) + eps)

    PyTorch keeps the maximum of the *raw* second moment and bias-corrects it with the current
    step's factor. `optax.scale_by_amsgrad` differs: it keeps the maximum of the bias-corrected
    v / (1 - b2^s) over past steps s (or, with bias_correction_nu=False, of raw v without any
    correction), which e.g. after a large first gradient and a zero second one divides by about
    sqrt(2) more than PyTorch (tests/dae_test.py shows both).
    """

    def init(params):
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)  # noqa: E731
        return TorchAmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

    def update(updates, state, params=None):
        del params
        tree_map = jax.tree_util.tree_map
        mu = tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
        nu = tree_map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), updates, state.nu)
        nu_max = tree_map(jnp.maximum, state.nu_max, nu)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        correction1, correction2 = 1 - b1**t, 1 - b2**t

        def step(m, v):
            return (m / correction1) / (jnp.sqrt(v) / jnp.sqrt(correction2) + eps)

        return tree_map(step, mu, nu_max), TorchAmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)


def make_dae_optimizer(config) -> optax.GradientTransformation:
    """PyTorch's Adam(lr, amsgrad=True, weight_decay=wd): the decay is added to the gradient
    before the moments (coupled L2, not AdamW), with a cosine learning rate from
    config.optim.learning_rate to 0 over config.optim.decay_steps steps, then 0.

    Deviation: theirs is CosineAnnealingLR(T_max=100) stepped per epoch of 32 steps, a cosine
    that rises again after 3,200 steps; here it ends at 0. decay_steps is its own key (not
    num_steps) so that extending a run does not change the schedule of the steps already taken.

    Every transformation is elementwise, so it runs on all parameters raveled into one vector
    (`optax.flatten`): the same updates (tests/dae_test.py), one set of array ops instead of one
    per parameter array, which roughly halves the train step's compile time on XLA:CPU. The
    moments in the state are then single vectors.
    """
    decay_steps = positive_int(config.optim.decay_steps, "optim.decay_steps")
    schedule = optax.cosine_decay_schedule(config.optim.learning_rate, decay_steps)
    return optax.flatten(
        optax.chain(
            optax.add_decayed_weights(config.optim.weight_decay),
            scale_by_torch_amsgrad(),
            optax.scale_by_learning_rate(schedule),
        )
    )


def create_dae_state(config, model, tx, key) -> TrainState:
    """Step 0 for slices of config.data.image_shape; GroupNorm keeps no batch statistics, so
    `batch_stats` is the empty dict (orbax stores and restores it, tests/dae_test.py)."""
    height, width = config.data.image_shape[:2]
    params = init_dae_variables(model, key, height, width)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params)
    )


def dae_loss(recon_BxHxW, clean_BxHxW, mask_BxHxW, num_slices: int) -> jax.Array:
    """sum((recon - clean)^2 * mask) / (num_slices * H * W).

    Their `(pow(recon - clean, 2) * mask).mean()` over a batch of real slices; `num_slices` is
    that static count, so the zero rows padding the batch to a multiple of the device count
    change neither the sum (they have no foreground) nor the denominator.
    """
    h, w = clean_BxHxW.shape[-2:]
    mask = mask_BxHxW.astype(jnp.float32)
    return jnp.sum(jnp.square(recon_BxHxW - clean_BxHxW) * mask) / (num_slices * h * w)


def _apply(model, params, slices_BxHxW) -> jax.Array:
    return model.apply({"params": params}, slices_BxHxW[..., None])[..., 0]


def _noise_settings(config) -> tuple[float, int]:
    """(std, res) of the corruption, read once when a step is built (static in the trace)."""
    return float(config.dae.noise_std), positive_int(config.dae.noise_res, "dae.noise_res")


def foreground(image_BxHxW: jax.Array) -> jax.Array:
    """Their mask of noise and loss, image > 0.01, as float32 0/1."""
    return (image_BxHxW > FOREGROUND_THRESHOLD).astype(jnp.float32)


def _corrupt(batch: dict, key: jax.Array, std: float, res: int):
    """(clean, foreground, noise on the foreground) of a slice batch."""
    clean = batch["image"].astype(jnp.float32)
    fg = foreground(clean)
    return clean, fg, dae_noise.masked_noise(key, fg, std, res)


def _check_rows(batch_rows: int, num_slices: int) -> None:
    if not 1 <= num_slices <= batch_rows:
        raise ValueError(f"num_slices={num_slices} must be in 1..{batch_rows} (the batch rows)")


def make_dae_train_step(model, tx, config, num_slices: int, mesh):
    """Jitted (state, batch, key) -> (state, metrics); `num_slices` real rows lead the batch.

    metrics: loss, grad_norm, param_norm, finite (0/1), noise_rms (RMS of the added noise on
    the foreground), valid_slices, and "stop" (max over rows) when the batch carries it.
    """

    def loss_fn(params, noisy, clean, fg):
        return dae_loss(_apply(model, params, noisy), clean, fg, num_slices)

    grad_fn = jax.value_and_grad(loss_fn)
    std, res = _noise_settings(config)

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        clean, fg, noise = _corrupt(batch, jax.random.fold_in(key, 0), std, res)
        _check_rows(clean.shape[0], num_slices)
        loss, grads = grad_fn(state.params, clean + noise, clean, fg)
        new_state, metrics = apply_step(tx, state, loss, grads, state.batch_stats, batch)
        metrics = {
            **metrics,
            "noise_rms": jnp.sqrt(weighted_mean(jnp.square(noise), fg)),
            "valid_slices": jnp.float32(num_slices),
        }
        return new_state, metrics

    return parallel.jit_train_step(train_step, mesh)


def make_dae_eval_step(model, config, num_slices: int, mesh):
    """Jitted (state, batch, key) -> {"val_loss", "val_mae"}: the training loss on noise from
    fold_in(key, 1), and the mean |recon - clean| over foreground pixels (0 when none)."""
    std, res = _noise_settings(config)

    def eval_step(state: TrainState, batch: dict, key: jax.Array):
        clean, fg, noise = _corrupt(batch, jax.random.fold_in(key, 1), std, res)
        _check_rows(clean.shape[0], num_slices)
        recon = _apply(model, state.params, clean + noise)
        return {
            "val_loss": dae_loss(recon, clean, fg, num_slices),
            "val_mae": weighted_mean(jnp.abs(recon - clean), fg),
        }

    return parallel.jit_eval_step(eval_step, mesh)


@functools.lru_cache(maxsize=8)
def _compiled_reconstruct(model, devices: tuple):
    mesh = parallel.create_mesh(list(devices))
    repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def reconstruct(variables, slices_BxHxW):
        # Only the parameters: restored states carry an empty "batch_stats" (p2l.train_state).
        return _apply(model, variables["params"], slices_BxHxW)

    return jax.jit(reconstruct, in_shardings=(repl, data), out_shardings=data)


def make_reconstruct(model, devices=None):
    """Jitted (variables, slices (B, H, W)) -> reconstructions (B, H, W) float32, the batch
    sharded over `devices` (default: this process's), so B must be a multiple of their count.
    One compiled function per (model, devices), as p2l.heatmaps.compiled_forward."""
    devices = tuple(jax.local_devices() if devices is None else devices)
    return _compiled_reconstruct(model, devices)
