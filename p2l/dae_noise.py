"""The denoising autoencoder's corruption: coarse, smooth Gaussian noise added on the foreground.

As Kascenas et al. (MIDL 2022): per slice, N(0, std) values on a res x res grid, upsampled
bilinearly to the slice with torch's `upsample_bilinear` rule (align_corners=True), shifted by
a random cyclic roll and multiplied by the foreground mask (theirs upsamples to 128 x 128, the
size of their slices; here to the slice size, whatever it is). The roll moves the grid points off
fixed pixel positions, so the noise has no fixed lattice the network could learn.

Deliberate deviation: every slice gets its own roll. Their `torch.roll` on the whole batch
shifts all slices of a step by one shared (roll_x, roll_y), a side effect of rolling the batch
tensor rather than a design choice; independent rolls give more varied noise per step and the
same distribution per slice.

Bilinear interpolation averages neighbouring grid values, so the noise's RMS is below `std`
(about 2/3 of it when the slice is much larger than the grid, theirs too); `expected_rms` gives
it exactly. Everything is a pure function of the key (same key, same noise) and jit-able: sizes
are static Python ints.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from p2l.heatmaps import _bilinear_taps


@functools.lru_cache(maxsize=16)
def interpolation_matrix(size: int, res: int) -> np.ndarray:
    """(size, res) float32 M with upsampled = M @ grid along one axis: the two taps of each
    output (torch's align_corners=True rule with its float32 source positions, the same taps
    as p2l.heatmaps.upsample_align_corners). Read-only: the cache hands out one copy."""
    i0, i1, w0, w1 = _bilinear_taps(size, res)
    rows = np.arange(size)
    m = np.zeros((size, res), np.float32)
    # add.at: at the last grid point both taps are the same index and their weights must sum.
    np.add.at(m, (rows, i0), w0)
    np.add.at(m, (rows, i1), w1)
    m.setflags(write=False)
    return m


def upsample_bilinear(grid_BxRxR: jax.Array, height: int, width: int, shifts_Bx2=None) -> jax.Array:
    """(B, res, res) grids -> (B, height, width), bilinear with align_corners=True; with
    `shifts_Bx2` (int (dy, dx) per slice) each result is then rolled as `jnp.roll(up, (dy, dx),
    axis=(0, 1))`, i.e. out[y, x] = up[(y - dy) % H, (x - dx) % W].

    Two small matrix products: exact on the grid points, linear in between. The roll is folded
    into the matrices (a gather of their rows), so it costs nothing on the full-size slices.
    """
    b, res_y, res_x = grid_BxRxR.shape
    my = jnp.asarray(interpolation_matrix(height, res_y))
    mx = jnp.asarray(interpolation_matrix(width, res_x))
    if shifts_Bx2 is None:
        ry = jnp.broadcast_to(my, (b, height, res_y))
        rx = jnp.broadcast_to(mx, (b, width, res_x))
    else:
        rows = (jnp.arange(height)[None, :] - shifts_Bx2[:, :1]) % height
        cols = (jnp.arange(width)[None, :] - shifts_Bx2[:, 1:]) % width
        ry, rx = my[rows], mx[cols]
    # HIGHEST: accelerators would otherwise multiply float32 in reduced precision (TF32 on GPU),
    # and the grid values would not be reproduced exactly.
    return jnp.einsum(
        "bhr,brs,bws->bhw",
        ry,
        grid_BxRxR.astype(jnp.float32),
        rx,
        precision=jax.lax.Precision.HIGHEST,
    )


def draw_noise(key: jax.Array, batch: int, height: int, width: int, std: float, res: int):
    """The random parts of `coarse_noise`: (grid (B, res, res) float32, shifts (B, 2) int32),
    shifts uniform in [0, height) x [0, width), one per slice."""
    grid_key, y_key, x_key = jax.random.split(key, 3)
    grid = std * jax.random.normal(grid_key, (batch, res, res), jnp.float32)
    dy = jax.random.randint(y_key, (batch,), 0, height, jnp.int32)
    dx = jax.random.randint(x_key, (batch,), 0, width, jnp.int32)
    return grid, jnp.stack([dy, dx], axis=1)


def coarse_noise(
    key: jax.Array, batch: int, height: int, width: int, std: float, res: int
) -> jax.Array:
    """(batch, height, width) float32 smooth noise: N(0, std) on a res x res grid per slice,
    upsampled (align_corners=True) and rolled by its own random shift."""
    grid, shifts = draw_noise(key, batch, height, width, std, res)
    return upsample_bilinear(grid, height, width, shifts)


def masked_noise(key: jax.Array, mask_BxHxW: jax.Array, std: float, res: int) -> jax.Array:
    """`coarse_noise` of the mask's shape, exactly 0 where mask <= 0."""
    b, h, w = mask_BxHxW.shape
    return jnp.where(mask_BxHxW > 0, coarse_noise(key, b, h, w, std, res), 0.0)


def add_noise(
    key: jax.Array, image_BxHxW: jax.Array, mask_BxHxW: jax.Array, std: float, res: int
) -> jax.Array:
    """image + coarse noise * (mask > 0): the denoising autoencoder's input."""
    return image_BxHxW + masked_noise(key, mask_BxHxW, std, res)


def expected_rms(height: int, width: int, std: float, res: int) -> float:
    """The RMS of `coarse_noise` over a slice, in expectation: the grid values are independent,
    so a pixel's variance is std**2 times the sum of its squared weights (the roll permutes
    pixels and leaves the slice average unchanged)."""
    my, mx = interpolation_matrix(height, res), interpolation_matrix(width, res)
    factor = np.mean(np.sum(my.astype(np.float64) ** 2, axis=1)) * np.mean(
        np.sum(mx.astype(np.float64) ** 2, axis=1)
    )
    return float(std * np.sqrt(factor))
