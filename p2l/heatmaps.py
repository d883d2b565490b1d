"""Sliding-window inference: lesion heatmaps of a volume (spec §5.2-§5.3).

Every `stride`-th pixel of every axial slice is the centre of one patch, cut exactly as in
training (zero padding by P//2, p2l.patches); no rejection at test time, background patches
included, the input is not masked (spec §5.2, §8.9); targets 100*(y/H, x/W) and slice position
100*z/D as in training. Per voxel:

    error  = ||mu - t||^2                        squared location error (0-100 units)
    logvar = mean_d s_d                          mean predicted log-variance
    score  = log(error + 1e-10) + logvar         variant "combined" (spec §5.3)

and the ablation variants "error" (log(error + 1e-10)) and "variance" (logvar). With stride > 1
the grid values of `error` and `logvar` are upsampled separately with the reference's bilinear
`align_corners=True` rule, and the score is taken afterwards, as the reference does.

Execution (README, "Performance"): the padded slices of the whole volume are placed on every local
device once, and the centres of *all* slices form one flat list cut into fixed-size batches
(static shapes, last batch padded), so batches mix slices and one compiled forward serves every
volume of a shape. A batch is sharded over the local devices along ('data',); patches are cut
out on device, so only three int32 per patch go in and two float32 per patch come back. JAX
dispatches asynchronously: the host prepares batch k+1 while the devices compute batch k, and
`start_volume_heatmap` returns before the device is done, so a caller can post-process the
previous volume (median filter, metrics) while this one runs.

Skipping (`region`): only patches whose values can reach the caller's region are evaluated; the
proof that this leaves the post-processed result unchanged is at `needed_grid`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from p2l import parallel, patches
from p2l.errors import ConfigError, DataError

VARIANTS = ("combined", "error", "variance")
DTYPES = ("float32", "bfloat16", "float16")
# log(error + 1e-10) as the reference (spec §5.3): a perfect localisation is finite.
ERROR_EPS = 1e-10


@dataclass(frozen=True)
class HeatmapResult:
    """Per-voxel outputs of one volume, all (H, W, D) float32.

    Outside `region` (when one was given) every array is 0: those voxels were not computed.
    """

    error: np.ndarray  # squared location error ||mu - t||^2
    logvar: np.ndarray  # mean predicted log-variance
    score: np.ndarray  # the variant's score
    patches_evaluated: int  # patch forwards actually run (padding slots not counted)
    variant: str = "combined"


def combine(error: np.ndarray, logvar: np.ndarray, variant: str = "combined") -> np.ndarray:
    """The anomaly score of a variant from per-voxel error and mean log-variance (spec §5.3)."""
    if variant == "combined":
        return (np.log(error + np.float32(ERROR_EPS)) + logvar).astype(np.float32)
    if variant == "error":
        return np.log(error + np.float32(ERROR_EPS)).astype(np.float32)
    if variant == "variance":
        return np.asarray(logvar, np.float32).copy()
    raise ConfigError("eval.variant", f"{variant!r}; expected one of {list(VARIANTS)}")


# --- the reference's upsampling (stride > 1) -------------------------------------------------


def grid_size(size: int, stride: int) -> int:
    """Number of centres along an axis: every stride-th pixel from 0 (spec §5.2)."""
    return len(range(0, size, stride))


def _bilinear_taps(size: int, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weights (w0, w1) of each of `size` outputs along one axis.

    torch's `F.interpolate(mode="bilinear", align_corners=True)` (the reference's
    `reshape_and_upsample`; `to_slice_maps` of the reference benchmark harness): float32
    scale (grid-1)/(size-1), source = scale*out, i0 = int(source), i1 = i0+1 clamped,
    w1 = source - i0, w0 = 1 - w1. Note that grid point i sits at output i*(size-1)/(grid-1),
    not at its patch centre i*stride (e.g. 4.06*i for 192 px at stride 4), as in the reference.
    """
    scale = np.float32((grid - 1) / (size - 1)) if size > 1 else np.float32(0.0)
    source = scale * np.arange(size, dtype=np.float32)
    i0 = np.minimum(source.astype(np.int64), grid - 1)
    i1 = np.minimum(i0 + 1, grid - 1)
    w1 = (source - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return i0, i1, w0, w1


def upsample_align_corners(grid_DxHoxWo: np.ndarray, height: int, width: int) -> np.ndarray:
    """Grid values (D, Ho, Wo) -> (D, H, W), the reference's bilinear align_corners=True rule.

    Same float32 operation order as torch's CPU kernel: interpolate along x inside, then y.
    """
    grid = np.asarray(grid_DxHoxWo, np.float32)
    _, ho, wo = grid.shape
    if (ho, wo) == (height, width):
        return grid.copy()
    y0, y1, wy0, wy1 = _bilinear_taps(height, ho)
    x0, x1, wx0, wx1 = _bilinear_taps(width, wo)
    along_x = wx0 * grid[:, :, x0] + wx1 * grid[:, :, x1]  # (D, Ho, W)
    return wy0[:, None] * along_x[:, y0] + wy1[:, None] * along_x[:, y1]


def _reads(size: int, grid: int) -> np.ndarray:
    """(size, grid) bool: output pixel o takes grid point i with a non-zero bilinear weight."""
    out = np.zeros((size, grid), bool)
    if grid == size:
        np.fill_diagonal(out, True)
        return out
    i0, i1, w0, w1 = _bilinear_taps(size, grid)
    rows = np.arange(size)
    # w0 = 1 - w1 > 0 always (w1 < 1); a zero weight multiplies the unevaluated grid value 0,
    # which adds exactly 0.
    out[rows[w0 > 0], i0[w0 > 0]] = True
    out[rows[w1 > 0], i1[w1 > 0]] = True
    return out


def needed_grid(region_HxWxD: np.ndarray, stride: int) -> np.ndarray:
    """Grid points (D, Ho, Wo) whose patch value reaches at least one voxel of the region.

    Why skipping the others leaves the final result unchanged (spec §5.4-5.5):
    post-processing is `mask * median_s(score)` (p2l.postprocess); voxels with mask <= 0 are 0
    whatever the score, and the median at a voxel v with mask > 0 reads only scores within
    Chebyshev distance s//2 of v (scipy's 'reflect' boundary maps an outside index p-k to k-p-1,
    which is still within distance k of p), so only scores on the dilation of (mask > 0) by an
    s-cube can matter: that is `postprocess.influence_region(mask, s)`, the `region` callers pass
    (brain-mask erosion only shrinks it). A voxel's score is a function of the grid values it
    reads: at stride 1 the one patch centred on it; at stride > 1 the two bilinear taps per axis
    of `_bilinear_taps` in its own slice (the reference interpolates each slice in-plane only).
    So evaluating every grid point read by some region voxel reproduces every region voxel's
    score exactly, hence the final result (a tap of weight 0 multiplies the finite placeholder 0
    of an unevaluated point: it adds exactly 0). With align_corners=True a grid point can reach
    voxels farther than stride-1 from its patch centre (see `_bilinear_taps`), so the read sets
    are computed from the interpolation itself rather than from a radius.
    """
    region = np.asarray(region_HxWxD, bool)
    h, w, _ = region.shape
    if stride == 1:
        return np.ascontiguousarray(region.transpose(2, 0, 1))
    ry = _reads(h, grid_size(h, stride)).astype(np.float32)  # (H, Ho)
    rx = _reads(w, grid_size(w, stride)).astype(np.float32)  # (W, Wo)
    # needed[z, i, j] = any_{y, x} ry[y, i] * region[y, x, z] * rx[x, j]; the counts stay exact
    # in float32 (at most H*W = 36,864 for 192x192).
    per_row = np.tensordot(ry.T, region.astype(np.float32), axes=(1, 0))  # (Ho, W, D)
    return np.einsum("iwz,wj->zij", per_row, rx) > 0


# --- the device forward -------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def compiled_forward(model, patch: int, devices: tuple, per_coordinate: bool = False):
    """The jitted model over patch centres (batch sharded over `devices`): per patch the squared
    location error and the mean log-variance (heatmaps), or with `per_coordinate` the predicted
    mean and log-variance of each coordinate (p2l.patch_outputs, the uncertainty report)."""
    mesh = parallel.create_mesh(list(devices))
    repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)

    def forward(variables, padded_DxHpxWp, position_D, centres_Nx3):
        z, y, x = centres_Nx3[:, 0], centres_Nx3[:, 1], centres_Nx3[:, 2]
        cut = patches.extract_patches(padded_DxHpxWp, z, y, x, patch)[..., None]
        mean, logvar = model.apply(variables, cut, position_D[z], train=False)
        if per_coordinate:
            return mean, logvar
        half = patch // 2
        height = padded_DxHpxWp.shape[1] - 2 * half
        width = padded_DxHpxWp.shape[2] - 2 * half
        target = patches.window_targets(y, x, height, width)
        error = jnp.sum(jnp.square(mean - target), axis=-1)
        return error, jnp.mean(logvar, axis=-1)

    return jax.jit(forward, in_shardings=(repl, repl, repl, data), out_shardings=(data, data))


def make_patch_forward(model, patch: int, dtype: str = "float32", devices=None):
    """Jitted forward (variables, padded (D,Hp,Wp), position (D,), centres (N,3) int32 z,y,x)
    -> (error (N,), mean log-variance (N,)), batch sharded over `devices` (default: local).

    `variables` are eval-mode {"params", "batch_stats"}; `dtype` is the compute dtype
    (float32 as the reference's training; bfloat16/float16 for accelerators).
    """
    _check_dtype(dtype)
    devices = tuple(jax.local_devices() if devices is None else devices)
    return compiled_forward(model.clone(dtype=jnp.dtype(dtype)), int(patch), devices)


def local_variables(variables: dict) -> dict:
    """This process's copy of replicated variables (multi-process runs score their own share of
    volumes on their own devices; a global array cannot move to a process-local mesh)."""

    def local(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return a

    return jax.tree_util.tree_map(local, variables)


# --- volumes ------------------------------------------------------------------------------------


def _check_dtype(dtype: str) -> None:
    if str(dtype) not in DTYPES:
        raise ConfigError("eval.dtype", f"{dtype!r}; expected one of {list(DTYPES)}")


def positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(key, f"must be a positive integer, got {value!r}")
    return int(value)


def check_volume(volume, region, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise DataError(name, f"expected a 3-D (H, W, D) volume, got shape {vol.shape}")
    if 0 in vol.shape:
        raise DataError(name, f"empty volume, shape {vol.shape}")
    if vol.dtype == bool or not np.issubdtype(vol.dtype, np.number) or np.iscomplexobj(vol):
        raise DataError(name, f"volume must be real-valued, got dtype {vol.dtype}")
    vol = vol.astype(np.float32, copy=False)
    if not np.isfinite(vol).all():
        raise DataError(name, f"volume has {int((~np.isfinite(vol)).sum())} non-finite voxel(s)")
    if region is None:
        return vol, None
    reg = np.asarray(region)
    if reg.shape != vol.shape:
        raise DataError(name, f"region shape {reg.shape} does not match volume shape {vol.shape}")
    return vol, reg.astype(bool, copy=False)


class PendingHeatmap:
    """A heatmap whose batches are dispatched; `result()` waits for them and assembles it."""

    def __init__(self, outputs, counts, grid_index, grid_shape, shape, region, variant):
        self._outputs = outputs  # [(error, logvar) device arrays] per batch
        self._counts = counts  # real (non-padding) entries of each batch
        self._grid_index = grid_index  # (z, iy, ix) of the evaluated grid points, batch order
        self._grid_shape = grid_shape  # (D, Ho, Wo)
        self._shape = shape  # (H, W, D)
        self._region = region
        self._variant = variant

    def result(self) -> HeatmapResult:
        n = int(sum(self._counts))
        err_grid = np.zeros(self._grid_shape, np.float32)
        lv_grid = np.zeros(self._grid_shape, np.float32)
        if n:
            fetched = jax.device_get(self._outputs)
            err_grid[self._grid_index] = np.concatenate(
                [e[:c] for (e, _), c in zip(fetched, self._counts, strict=True)]
            )
            lv_grid[self._grid_index] = np.concatenate(
                [v[:c] for (_, v), c in zip(fetched, self._counts, strict=True)]
            )
        self._outputs = []
        h, w, _ = self._shape
        # Slice-first (D, H, W) as the reference's maps, then the project's (H, W, D).
        error = np.ascontiguousarray(upsample_align_corners(err_grid, h, w).transpose(1, 2, 0))
        logvar = np.ascontiguousarray(upsample_align_corners(lv_grid, h, w).transpose(1, 2, 0))
        score = combine(error, logvar, self._variant)
        if self._region is not None:
            outside = ~self._region
            for arr in (error, logvar, score):
                arr[outside] = 0.0
        return HeatmapResult(error, logvar, score, n, self._variant)


def batch_for(n: int, batch_size: int, devices: int) -> int:
    """Global batch: batch_size per device, or for a small volume the next power of two per
    device that holds it (few distinct static shapes, so few compilations)."""
    per_device = -(-max(n, 1) // devices)
    if per_device >= batch_size:
        return batch_size * devices
    return min(batch_size, 1 << (per_device - 1).bit_length()) * devices


def start_volume_heatmap(
    model,
    variables,
    volume_HxWxD,
    *,
    patch: int,
    stride: int = 1,
    batch_size: int = 1024,
    num_slices: int | None = None,
    region=None,
    dtype: str = "float32",
    variant: str = "combined",
    name: str = "volume",
) -> PendingHeatmap:
    """Dispatches the heatmap of one volume and returns at once (JAX runs it asynchronously);
    `PendingHeatmap.result()` waits and gives the error, mean log-variance and score of every
    voxel of the (H, W, D) volume (spec §5.2-5.3).

    Args:
      model, variables: the Patch2Loc module and its eval-mode {"params", "batch_stats"}.
      volume_HxWxD: the normalised scan, axial slices last, not masked (spec §5.2).
      patch: patch side P (training's int(patch_fraction * H)).
      stride: every stride-th pixel of each slice is a centre; > 1 upsamples bilinearly with
        align_corners=True as the reference.
      batch_size: patches per forward per local device (static; the last batch is padded).
      num_slices: D of the position code 100*z/num_slices (default: the volume's D).
      region: optional bool (H, W, D): the voxels whose values the caller needs, e.g.
        `postprocess.influence_region(mask, median_size)`. Only patches that reach it are
        evaluated (proof at `needed_grid`); every output is 0 outside it.
      dtype: compute dtype, "float32" (default) or "bfloat16"/"float16".
      variant: "combined" | "error" | "variance" (which score `HeatmapResult.score` holds).
      name: names the volume (e.g. its file) in error messages.

    Raises:
      DataError: the volume is not a finite 3-D array, or the region's shape differs.
      ConfigError: stride, batch_size, dtype or variant is invalid.
    """
    patch = positive_int(patch, "patch")
    stride = positive_int(stride, "eval.stride")
    batch_size = positive_int(batch_size, "eval.batch_size")
    _check_dtype(dtype)
    if variant not in VARIANTS:
        raise ConfigError("eval.variant", f"{variant!r}; expected one of {list(VARIANTS)}")
    vol, reg = check_volume(volume_HxWxD, region, name)
    h, w, d = vol.shape
    total = d if num_slices is None else positive_int(num_slices, "num_slices")

    devices = tuple(jax.local_devices())
    forward = make_patch_forward(model, patch, dtype, devices)
    mesh = parallel.create_mesh(list(devices))
    repl = parallel.replicated(mesh)

    ys, xs = patches.sliding_window_centres(h, w, stride)
    grid_shape = (d, len(ys), len(xs))
    needed = np.ones(grid_shape, bool) if reg is None else needed_grid(reg, stride)
    # Slice-major order: consecutive batches walk through the volume slice by slice.
    grid_index = np.nonzero(needed)
    z, iy, ix = grid_index
    centres = np.stack([z, ys[iy], xs[ix]], axis=1).astype(np.int32)
    global_batch = batch_for(len(centres), batch_size, len(devices))

    # Slice-first padded stack (spec §5.2: zero padding by P//2), sent once per volume.
    padded = jax.device_put(patches.pad_slices(jnp.asarray(vol.transpose(2, 0, 1)), patch), repl)
    # Positions as training computes them (input_pipeline.assemble_batch): 100*z/D in float64,
    # then float32.
    position = jax.device_put(patches.slice_position(np.arange(d), total).astype(np.float32), repl)
    variables = jax.device_put(local_variables(variables), repl)

    outputs, counts = [], []
    for start in range(0, len(centres), global_batch):
        chunk = centres[start : start + global_batch]
        counts.append(len(chunk))
        if len(chunk) < global_batch:  # static shapes: pad the last batch with centre (0, 0, 0)
            chunk = np.concatenate([chunk, np.zeros((global_batch - len(chunk), 3), np.int32)])
        # Dispatched asynchronously: the host goes on to the next batch at once.
        outputs.append(forward(variables, padded, position, chunk))
    return PendingHeatmap(outputs, counts, grid_index, grid_shape, vol.shape, reg, variant)


def volume_heatmap(model, variables, volume_HxWxD, **options) -> HeatmapResult:
    """`start_volume_heatmap(...).result()`: the finished heatmap of one volume."""
    return start_volume_heatmap(model, variables, volume_HxWxD, **options).result()
