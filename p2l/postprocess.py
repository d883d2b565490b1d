"""Lesion-map post-processing: 3-D median filter, brain masking, optional pDDPM clean-up.

The reference (spec §5.4-§5.5) filters the raw score volume with a 7x7x7 median filter
(`cupyx.scipy.ndimage.median_filter(h, size=7)`, mode 'reflect') and then multiplies it by the raw,
possibly fractional brain mask. It neither erodes the mask nor removes small connected components
(spec §8.15); both exist here only as options for the pDDPM protocol.

Everything here is host numpy/scipy. Arrays are (H, W, D) volumes in the project's layout, but the
functions accept any number of dimensions.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from p2l.errors import ConfigError, DataError

# Spec §5.4: `median_filter_size: 7` for every non-IXI dataset.
DEFAULT_MEDIAN_SIZE = 7

# Voxels per gathered block in `median_filter`: the (block, size**ndim) window matrix stays a few MB
# and fits in cache.
_BLOCK_VOXELS = 1024


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ConfigError("median_size", f"must be an odd integer >= 1, got {size!r}")
    if size < 1 or size % 2 == 0:
        # An even cube has no centre voxel; scipy would shift it by its `origin` rule, which the
        # reference never used (spec §5.4: size 7).
        raise ConfigError("median_size", f"must be an odd integer >= 1, got {size}")
    return int(size)


def _check_score(score: np.ndarray, name: str) -> np.ndarray:
    score = np.asarray(score)
    if score.ndim == 0:
        raise DataError(name, "score must be an array with at least one dimension, got a scalar")
    if score.dtype == bool or not np.issubdtype(score.dtype, np.number):
        raise DataError(name, f"score must be a real numeric array, got dtype {score.dtype}")
    if np.iscomplexobj(score):
        raise DataError(name, f"score must be real, got dtype {score.dtype}")
    return score


def _check_same_shape(score: np.ndarray, other: np.ndarray, what: str, name: str) -> None:
    if other.shape != score.shape:
        raise DataError(
            name, f"{what} shape {other.shape} does not match score shape {score.shape}"
        )


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _median_blocks(
    flat_padded: np.ndarray,
    corners: np.ndarray,
    offsets: np.ndarray,
    kth: int,
    out: np.ndarray,
    starts: list[int],
) -> None:
    """Median of the windows whose first voxel is at `corners[s:s+block]`, for each s in starts."""
    idx = np.empty((_BLOCK_VOXELS, offsets.size), dtype=np.intp)
    win = np.empty((_BLOCK_VOXELS, offsets.size), dtype=flat_padded.dtype)
    for start in starts:
        stop = min(start + _BLOCK_VOXELS, corners.size)
        n = stop - start
        # Reused buffers: fresh 5 MB arrays per block would cost page faults on every block.
        np.add(corners[start:stop, None], offsets[None, :], out=idx[:n])
        np.take(flat_padded, idx[:n], out=win[:n])
        win[:n].partition(kth, axis=1)
        out[start:stop] = win[:n, kth]


def median_filter(
    score: np.ndarray,
    size: int = DEFAULT_MEDIAN_SIZE,
    *,
    where: np.ndarray | None = None,
    workers: int | None = None,
    name: str = "score",
) -> np.ndarray:
    """Median over a `size`-cube around each voxel, boundary mode 'reflect' (spec §5.4).

    Returns exactly `scipy.ndimage.median_filter(score, size=size, mode="reflect")`, which is also
    what the reference's `cupyx.scipy.ndimage.median_filter` computes: cupyx mirrors scipy.ndimage's
    API and boundary modes, and the median of an odd-sized window (rank size**ndim // 2) is one
    input value, so both give identical results.

    This formulation pads once with numpy's 'symmetric' mode (== scipy 'reflect', including
    repeated reflection on tiny axes), gathers each window into a row and selects its middle
    element with `np.partition`: less CPU than scipy's filter (README, "Performance"), and numpy
    releases the GIL, so `workers` threads run in parallel.

    Args:
      score: real array, any number of dimensions.
      size: odd cube side; 1 returns a copy.
      where: optional boolean array of score's shape: only these voxels are computed, the others are
        set to 0. `postprocess` uses the brain mask here, since it zeroes everything else anyway.
      workers: threads; default = the CPUs this process may use.
      name: names the volume in error messages (e.g. its file path).

    Raises:
      DataError: bad shapes or dtypes, or a non-finite value inside a window that is computed
        (NaN has no place in an order statistic; values outside every computed window are ignored).
      ConfigError: size is not an odd integer >= 1.
    """
    score = _check_score(score, name)
    size = _check_size(size)
    if where is not None:
        where = np.asarray(where, dtype=bool)
        _check_same_shape(score, where, "where", name)
    if size == 1:
        out = score.copy()
        if where is not None:
            out[~where] = 0
        return out

    radius = size // 2
    support = None if where is None else influence_region(where, size)
    finite = np.isfinite(score) if support is None else np.isfinite(score[support])
    if not finite.all():
        raise DataError(
            name,
            f"score has {finite.size - int(finite.sum())} non-finite value(s) where the median "
            "filter reads it",
        )
    padded = np.pad(score, radius, mode="symmetric")
    # Flat offset of every voxel of a window relative to its first voxel, in the padded array.
    strides = np.array([s // padded.itemsize for s in padded.strides], dtype=np.intp)
    grids = np.meshgrid(*[np.arange(size, dtype=np.intp)] * score.ndim, indexing="ij")
    offsets = sum(g.ravel() * st for g, st in zip(grids, strides, strict=True))
    # A window's first voxel in padded coordinates has the output voxel's own index tuple.
    corners = functools.reduce(
        np.add.outer,
        [np.arange(n, dtype=np.intp) * st for n, st in zip(score.shape, strides, strict=True)],
    )
    corners = corners.ravel() if where is None else corners[where]
    values = np.empty(corners.size, dtype=score.dtype)

    starts = list(range(0, corners.size, _BLOCK_VOXELS))
    n_workers = min(workers or _default_workers(), max(1, len(starts)))
    kth = offsets.size // 2
    flat = padded.ravel()
    if n_workers == 1:
        _median_blocks(flat, corners, offsets, kth, values, starts)
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            jobs = [
                pool.submit(
                    _median_blocks, flat, corners, offsets, kth, values, starts[i::n_workers]
                )
                for i in range(n_workers)
            ]
            for job in jobs:
                job.result()

    if where is None:
        return values.reshape(score.shape)
    out = np.zeros_like(score)
    out[where] = values
    return out


def influence_region(mask: np.ndarray, median_size: int | None) -> np.ndarray:
    """Voxels whose score can change `postprocess(score, mask, median_size=...)`.

    After masking only voxels with mask > 0 keep a value, and each of those reads a cube of
    Chebyshev radius median_size // 2 around it ('reflect' boundary copies stay inside that cube).
    So the region is the binary dilation of (mask > 0) by a cube of side median_size; scores outside
    it may be anything, including NaN, without changing the result. Brain-mask erosion only
    shrinks the mask, so the region stays valid with it. Inference may skip patches outside it.
    """
    brain = np.asarray(mask) > 0
    if not median_size or median_size == 1:
        return brain.copy()
    size = _check_size(median_size)
    # A maximum filter with a full cube is separable, much faster than binary_dilation's 3-D
    # structure; outside the volume counts as background.
    return ndimage.maximum_filter(brain.view(np.uint8), size=size, mode="constant", cval=0) > 0


def apply_brain_mask(
    score: np.ndarray, mask: np.ndarray, *, binarize: bool = False, name: str = "score"
) -> np.ndarray:
    """Multiply the score by the brain mask (spec §5.5), keeping the score's dtype.

    The reference multiplies by the raw mask, whose borders are fractional after linear
    interpolation in registration (spec §2.1); `binarize=True` multiplies by (mask > 0) instead.
    Voxels with mask <= 0 are exactly 0 even where the score is not finite (0 * NaN would be NaN).
    """
    score = _check_score(score, name)
    mask = np.asarray(mask)
    _check_same_shape(score, mask, "mask", name)
    brain = mask > 0
    out = np.zeros_like(score)
    if binarize:
        out[brain] = score[brain]
        return out
    # Multiply in the score's dtype, as the reference's float32 torch tensors did; only inside the
    # brain, so that a non-finite background score never meets a zero weight.
    weights = (
        mask[brain].astype(score.dtype, copy=False) if score.dtype.kind == "f" else mask[brain]
    )
    out[brain] = score[brain] * weights
    return out


def erode_brain_mask(mask: np.ndarray, iterations: int, *, axial_only: bool = False) -> np.ndarray:
    """Binary erosion of (mask > 0) with the 6-neighbour cross, `iterations` times.

    pDDPM's `apply_brainmask_volume` erodes each axial slice in 2-D (4-neighbour cross,
    iterations = width // 25); `axial_only=True` reproduces that (the last axis is axial), the
    default erodes in 3-D. Outside the volume counts as background, as in scipy.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int | np.integer):
        raise ConfigError("erode_mask_iterations", f"must be an integer >= 0, got {iterations!r}")
    if iterations < 0:
        raise ConfigError("erode_mask_iterations", f"must be >= 0, got {iterations}")
    brain = np.asarray(mask) > 0
    if iterations == 0:
        return brain
    structure = ndimage.generate_binary_structure(brain.ndim, 1)
    if axial_only:
        # Drop the two neighbours along the last (axial) axis: a 2-D cross within each slice.
        structure[..., 0] = False
        structure[..., 2] = False
    return ndimage.binary_erosion(brain, structure=structure, iterations=int(iterations))


def remove_small_components(binary: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components of at most `min_voxels` voxels from a binary prediction.

    pDDPM's `filter_3d_connected_components` removes components whose skimage `filled_area`
    (voxels with holes filled) is <= 7. Here the plain voxel count is used; the two differ only for
    a component of <= min_voxels voxels that encloses a hole, which is not possible below 6 voxels.
    Applies after thresholding, so it takes the binary prediction, not the score.
    """
    if isinstance(min_voxels, bool) or not isinstance(min_voxels, int | np.integer):
        raise ConfigError("min_component_voxels", f"must be an integer >= 0, got {min_voxels!r}")
    if min_voxels < 0:
        raise ConfigError("min_component_voxels", f"must be >= 0, got {min_voxels}")
    binary = np.asarray(binary, dtype=bool)
    if min_voxels == 0 or not binary.any():
        return binary.copy()
    # skimage's label(connectivity=3) on a 3-D volume == full 3x3x3 neighbourhood.
    labels, _ = ndimage.label(binary, structure=np.ones((3,) * binary.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel())
    keep = sizes > min_voxels
    keep[0] = False
    return keep[labels]


def postprocess(
    score: np.ndarray,
    mask: np.ndarray,
    *,
    median_size: int | None = DEFAULT_MEDIAN_SIZE,
    erode_mask_iterations: int = 0,
    binarize_mask: bool = False,
    workers: int | None = None,
    name: str = "score",
) -> np.ndarray:
    """Score volume -> lesion map: median filter, then brain mask (spec §5.4-§5.5).

    Defaults are the reference's: 7-cube median filter on the whole volume *before* masking (so
    background predictions leak up to 3 voxels into the brain border, spec §8.14), then
    multiplication by the raw fractional mask; no erosion (spec §8.15). The median is computed only
    where the mask is > 0, which gives the same result since everything else is zeroed.

    Options for the pDDPM protocol: `erode_mask_iterations` erodes (mask > 0) in 3-D first and keeps
    the raw mask values inside the eroded region; connected-component removal works on binary
    predictions, see `remove_small_components`. `median_size` 0, 1 or None disables the filter.

    Scores outside `influence_region(mask, median_size)` do not affect the result.
    """
    score = _check_score(score, name)
    mask = np.asarray(mask)
    _check_same_shape(score, mask, "mask", name)
    if erode_mask_iterations:
        eroded = erode_brain_mask(mask, erode_mask_iterations)
        mask = np.where(eroded, mask, 0)
    if median_size:
        score = median_filter(score, median_size, where=mask > 0, workers=workers, name=name)
    return apply_brain_mask(score, mask, binarize=binarize_mask, name=name)
