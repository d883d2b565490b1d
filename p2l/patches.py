"""Patch geometry shared by training and inference (spec §3.2, §5.2). Jittable, static shapes.

Conventions (as the reference): a slice (H, W) is zero-padded by P//2 on each side and the patch
"centred" at pixel (y, x) is padded[y:y+P, x:x+P], i.e. rows y-P//2 ... y+P//2-1 for even P.
Targets are 100*(y/H, x/W); the slice position fed to the encoder is 100*z/num_slices.

Static shapes in training (a documented deviation, conventions "Static shapes"). The reference
draws C = 4*8096 = 32,384 candidates per step with the slice index uniform over the B slices and
keeps those with >= 20 % brain, so the number of patches per step varies. Inside `jit` we:
1. stratify the candidates: every slice gets K = ceil(C/B) candidates (y, x uniform), and the
   candidates whose global index slice*K + k is >= C are switched off, so exactly C candidates
   are drawn per step and the *expected number of valid patches per step equals the
   reference's*; only the per-slice counts lose their multinomial jitter. Each slice's draws
   come from `fold_in(key, slice_index_in_batch)`, so they do not depend on how the batch is
   sharded over devices.
2. apply the reference's rejection rule exactly (mean(mask_patch == 1) >= rejection_rate);
3. compact the accepted candidates into a fixed-capacity buffer (valid ones first, in draw order)
   with weight 1, padding slots weight 0. The loss averages over weight-1 patches and BatchNorm
   statistics ignore weight-0 ones, so as long as the buffer does not overflow the step is the
   reference's variable-size step. Overflow (more accepted candidates than capacity) drops the
   excess, is counted in the step metrics and reported by the training loop.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def patch_size_for(image_side: int, patch_fraction: float) -> int:
    """Patch side = int(patch_fraction * image side): 24 px for 192 at 0.125 (spec §3.2)."""
    return int(patch_fraction * image_side)


def candidates_per_slice(num_candidates: int, num_slices: int) -> int:
    """K = ceil(C / B): per-slice candidate count of the stratified draw."""
    return math.ceil(num_candidates / num_slices)


def pad_slices(slices_BxHxW: jax.Array, patch: int) -> jax.Array:
    """Zero padding by patch//2 on each in-plane side (spec §3.2, §5.2)."""
    half = patch // 2
    return jnp.pad(slices_BxHxW, ((0, 0), (half, half), (half, half)))


def extract_patches(
    padded_BxHpxWp: jax.Array, slice_N: jax.Array, y_N: jax.Array, x_N: jax.Array, patch: int
) -> jax.Array:
    """Patches (N, P, P) centred at (y, x) of slice `slice_N` of the padded slices."""

    def one(b, y, x):
        return jax.lax.dynamic_slice(padded_BxHpxWp[b], (y, x), (patch, patch))

    return jax.vmap(one)(slice_N, y_N, x_N)


class Candidates(NamedTuple):
    y: jax.Array  # (b, K) int32
    x: jax.Array  # (b, K) int32
    accepted: jax.Array  # (b, K) bool


def draw_candidates(
    key: jax.Array,
    mask_one_bxHxW: jax.Array,
    slice_index_b: jax.Array,
    per_slice: int,
    num_candidates: int,
    patch: int,
    rejection_rate: float,
) -> Candidates:
    """Stratified candidate centres with the reference's rejection rule (spec §3.2).

    mask_one: 1 where the brain mask equals exactly 1 (spec §8.10). slice_index_b: each slice's
    index in the global batch (keys and the global candidate cut-off C depend on it only).
    """
    b, h, w = mask_one_bxHxW.shape

    def per_slice_draw(idx):
        ky, kx = jax.random.split(jax.random.fold_in(key, idx))
        y = jax.random.randint(ky, (per_slice,), 0, h, dtype=jnp.int32)
        x = jax.random.randint(kx, (per_slice,), 0, w, dtype=jnp.int32)
        return y, x

    y, x = jax.vmap(per_slice_draw)(slice_index_b)  # (b, K) each
    # Mask pixels in each candidate's window, counted in the window itself (exact integers): a
    # summed-area table of every slice per step is far slower, as XLA:CPU lowers cumsum to a
    # quadratic reduce-window (README, "Performance").
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], y.shape)
    windows = extract_patches(
        pad_slices(mask_one_bxHxW, patch), rows.ravel(), y.ravel(), x.ravel(), patch
    )
    counts = jnp.sum(windows.astype(jnp.int32), axis=(1, 2)).reshape(y.shape)
    # mean(mask_patch == 1) >= rate, evaluated in float32 like the reference.
    frac = counts.astype(jnp.float32) / float(patch * patch)
    in_budget = slice_index_b[:, None] * per_slice + jnp.arange(per_slice) < num_candidates
    accepted = (frac >= rejection_rate) & in_budget
    return Candidates(y, x, accepted)


def compact(accepted_N: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the first `capacity` accepted entries (draw order), and their validity."""
    order = jnp.argsort(~accepted_N, stable=True)[:capacity]
    return order, accepted_N[order]


class PatchBatch(NamedTuple):
    patches: jax.Array  # (M, P, P, 1) float32
    position: jax.Array  # (M,) slice position 100*z/num_slices
    target: jax.Array  # (M, 2) 100*(y/H, x/W)
    weight: jax.Array  # (M,) 1 valid, 0 padding
    num_accepted: jax.Array  # () accepted candidates before the capacity cut
    num_overflow: jax.Array  # () accepted candidates dropped for lack of capacity


def sample_training_patches(
    key: jax.Array,
    image_bxHxW: jax.Array,
    mask_one_bxHxW: jax.Array,
    position_b: jax.Array,
    slice_index_b: jax.Array,
    *,
    per_slice: int,
    num_candidates: int,
    capacity: int,
    patch: int,
    rejection_rate: float,
) -> PatchBatch:
    """Random training patches of a (local) batch of slices, static shapes (module docstring).

    image: the slices already multiplied by the brain mask (spec §8.9).
    """
    b, h, w = image_bxHxW.shape
    cand = draw_candidates(
        key, mask_one_bxHxW, slice_index_b, per_slice, num_candidates, patch, rejection_rate
    )
    flat_accepted = cand.accepted.reshape(-1)
    order, valid = compact(flat_accepted, capacity)
    slice_n = (order // per_slice).astype(jnp.int32)
    y_n = cand.y.reshape(-1)[order]
    x_n = cand.x.reshape(-1)[order]
    patches = extract_patches(pad_slices(image_bxHxW, patch), slice_n, y_n, x_n, patch)
    target = window_targets(y_n, x_n, h, w)
    num_accepted = jnp.sum(flat_accepted.astype(jnp.int32))
    return PatchBatch(
        patches=patches[..., None],
        position=position_b[slice_n],
        target=target,
        weight=valid.astype(jnp.float32),
        num_accepted=num_accepted,
        num_overflow=jnp.maximum(num_accepted - capacity, 0),
    )


def sliding_window_centres(height: int, width: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Patch centres of the inference sweep: every `stride`-th pixel from 0 (spec §5.2)."""
    return np.arange(0, height, stride), np.arange(0, width, stride)


def window_targets(y_N: jax.Array, x_N: jax.Array, height: int, width: int) -> jax.Array:
    """Location targets 100*(y/H, x/W), as in training (spec §5.2)."""
    return 100.0 * jnp.stack([y_N / height, x_N / width], axis=-1).astype(jnp.float32)


def slice_position(z: jax.Array | np.ndarray, num_slices: int):
    """Encoder input 100*z/num_slices (spec §3.1: the raw index 0..99 for 100 slices)."""
    return 100.0 * z / num_slices
