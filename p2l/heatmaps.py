"""Sliding-window inference: every pixel's patch localised -> error, variance and score maps
(spec §5.2-5.3).

One patch per grid pixel (stride 1 by default) of every axial slice, zero padding by half a patch,
no rejection and no masking of the input at test time, positions 100*z/D and targets as in
training (p2l.patches). Patches are cut on device from the padded volume and evaluated by one
jitted forward over fixed-size batches (static shapes: the last batch is padded), sharded over all
local devices along ('data',). All batches are dispatched before any result is fetched, so the
host queues work while the devices compute.

Outputs per voxel: squared location error ||mu - t||^2, mean predicted log-variance, and the score
log(error + 1e-10) + mean log-variance ("combined", spec §5.3), or the error or variance term
alone ("error" / "variance"). With stride > 1 the error and variance maps are upsampled exactly as
the reference does (bilinear, align_corners=True, from the (H/s, W/s) grid to (H, W)).

Skipping patches (`region`): a grid value only reaches the voxels its bilinear weights touch,
i.e. output pixels i with |i - g*r| < r where r = (H-1)/(Ho-1) is the align_corners scale (r = 1
at stride 1: only the grid pixel itself). The post-processed result (median filter of side s, then
brain mask) only reads voxels within s//2 of the brain (p2l.postprocess.influence_region). So a
grid point none of whose touched pixels lies in that region cannot change the final result: it
is not evaluated and its value is left at 0 (tested in tests/heatmaps_test.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from p2l import parallel, patches

EPSILON = 1e-10  # log(error + 1e-10), spec §5.3
VARIANTS = ("combined", "error", "variance")


@dataclass
class HeatmapResult:
    error: np.ndarray  # (H, W, D) squared location error
    logvar: np.ndarray  # (H, W, D) mean predicted log-variance
    score: np.ndarray  # (H, W, D) the chosen variant's score
    patches_evaluated: int


def combine(error: np.ndarray, logvar: np.ndarray, variant: str = "combined") -> np.ndarray:
    if variant == "combined":
        return (np.log(error + EPSILON) + logvar).astype(np.float32)
    if variant == "error":
        return np.log(error + EPSILON).astype(np.float32)
    if variant == "variance":
        return logvar.astype(np.float32)
    raise ValueError(f"unknown heatmap variant {variant!r}; expected one of {VARIANTS}")


def align_corners_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: (lower source index, upper source index, upper weight)."""
    if n_in == 1 or n_out == 1:
        zeros = np.zeros(n_out, np.int64)
        return zeros, zeros, np.zeros(n_out)
    src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo


def upsample_align_corners(grid_ZxHoxWo: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (align_corners=True) resize of each slice, as torch F.interpolate (spec §5.2)."""
    z, ho, wo = grid_ZxHoxWo.shape
    if (ho, wo) == (height, width):
        return grid_ZxHoxWo
    y0, y1, wy = align_corners_weights(height, ho)
    x0, x1, wx = align_corners_weights(width, wo)
    g = grid_ZxHoxWo.astype(np.float64)
    rows = g[:, y0, :] * (1 - wy)[None, :, None] + g[:, y1, :] * wy[None, :, None]
    out = rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]
    return out.astype(np.float32)


def grid_points_needed(region_HxWxD: np.ndarray, stride: int) -> np.ndarray:
    """(D, Ho, Wo) bool: grid points whose interpolation weights touch the region."""
    h, w, d = region_HxWxD.shape
    ho, wo = len(range(0, h, stride)), len(range(0, w, stride))

    def touched(n_out, n_in):
        # Output pixel i reads grid indices lo[i] and hi[i] (with weight > 0 or lo itself).
        lo, hi, wt = align_corners_weights(n_out, n_in)
        m = np.zeros((n_in, n_out), bool)
        m[lo, np.arange(n_out)] = True
        m[hi[wt > 0], np.arange(n_out)[wt > 0]] = True
        return m  # (grid index, output pixel)

    ty, tx = touched(h, ho), touched(w, wo)
    region = np.moveaxis(region_HxWxD, 2, 0).astype(np.float32)  # (D, H, W)
    hits = np.einsum("gh,zhw,kw->zgk", ty.astype(np.float32), region, tx.astype(np.float32))
    return hits > 0


def local_variables(variables: dict) -> dict:
    """Host copies of (replicated) variables, so a multi-process run can evaluate its share of
    volumes on its own devices (global arrays cannot be moved to a process-local mesh)."""

    def local(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return a

    return jax.tree_util.tree_map(local, variables)


@partial(jax.jit, static_argnames=("model", "patch"))
def _forward(model, variables, padded_DxHpxWp, z_N, y_N, x_N, height, width, num_slices, patch):
    cut = patches.extract_patches(padded_DxHpxWp, z_N, y_N, x_N, patch)[..., None]
    position = patches.slice_position(z_N.astype(jnp.float32), num_slices)
    mean, logvar = model.apply(variables, cut.astype(model.dtype), position, train=False)
    target = patches.window_targets(y_N, x_N, height, width)
    error = jnp.sum((mean - target) ** 2, axis=-1)
    return error, jnp.mean(logvar, axis=-1)


def volume_heatmap(
    model,
    variables: dict,
    volume_HxWxD: np.ndarray,
    *,
    patch: int,
    stride: int = 1,
    batch_size: int = 4096,
    num_slices: int | None = None,
    region: np.ndarray | None = None,
    dtype: str = "float32",
    variant: str = "combined",
) -> HeatmapResult:
    """Error, log-variance and score maps (H, W, D) of one normalised volume."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown heatmap variant {variant!r}; expected one of {VARIANTS}")
    h, w, d = volume_HxWxD.shape
    num_slices = d if num_slices is None else num_slices
    ys, xs = patches.sliding_window_centres(h, w, stride)
    ho, wo = len(ys), len(xs)
    if region is None:
        needed = np.ones((d, ho, wo), bool)
    else:
        needed = grid_points_needed(np.asarray(region, bool), stride)
    zi, yi, xi = np.nonzero(needed)
    n = len(zi)

    mesh = parallel.create_mesh(jax.local_devices())
    ndev = mesh.devices.size
    batch = parallel.padded_size(min(batch_size, max(n, 1)), ndev)
    total = parallel.padded_size(max(n, 1), batch)
    pad = total - n
    z_all = np.concatenate([zi, np.zeros(pad, np.int64)]).astype(np.int32)
    y_all = np.concatenate([ys[yi], np.zeros(pad, np.int64)]).astype(np.int32)
    x_all = np.concatenate([xs[xi], np.zeros(pad, np.int64)]).astype(np.int32)

    compute = model.clone(dtype=jnp.dtype(dtype))
    if jnp.dtype(dtype) != jnp.float32:
        variables = jax.tree_util.tree_map(lambda a: a.astype(dtype), variables)
    repl = parallel.replicated(mesh)
    shard = parallel.batch_sharded(mesh)
    variables = jax.device_put(local_variables(variables), repl)
    slices = np.moveaxis(np.asarray(volume_HxWxD, np.float32), 2, 0)  # (D, H, W)
    padded = jax.device_put(patches.pad_slices(jnp.asarray(slices), patch), repl)

    outputs = []
    for start in range(0, total, batch):
        sl = slice(start, start + batch)
        z, y, x = (jax.device_put(a[sl], shard) for a in (z_all, y_all, x_all))
        outputs.append(
            _forward(compute, variables, padded, z, y, x, h, w, float(num_slices), patch)
        )  # dispatched asynchronously; fetched below
    err_flat = np.concatenate([np.asarray(e, np.float32) for e, _ in outputs])[:n]
    lv_flat = np.concatenate([np.asarray(v, np.float32) for _, v in outputs])[:n]

    err_grid = np.zeros((d, ho, wo), np.float32)
    lv_grid = np.zeros((d, ho, wo), np.float32)
    err_grid[zi, yi, xi] = err_flat
    lv_grid[zi, yi, xi] = lv_flat
    error = np.moveaxis(upsample_align_corners(err_grid, h, w), 0, 2)
    logvar = np.moveaxis(upsample_align_corners(lv_grid, h, w), 0, 2)
    return HeatmapResult(
        error=np.ascontiguousarray(error),
        logvar=np.ascontiguousarray(logvar),
        score=combine(error, logvar, variant),
        patches_evaluated=n,
    )
