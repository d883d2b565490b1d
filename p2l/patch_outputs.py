"""Per-patch model outputs on the non-overlapping patch grid of a volume: what the uncertainty
report (p2l.uncertainty) is computed from (spec §5, "Abnormality analysis mode").

Grid: every P-th pixel of each axial slice is a patch centre (stride = patch side P, the
project's one centre rule, `patches.sliding_window_centres`); each patch is cut exactly as in
training and in the heatmaps (p2l.patches: zero padding by P//2, padded[y:y+P, x:x+P]), so the
patches tile the slice without overlap. With centres 0, P, 2P, ... they cover rows -P//2 ..
ceil(H/P)*P - P//2 - 1 (for 192 px and P = 24: rows -12..179; the last 12 rows, background in
practice, belong to no patch).

Rejection: a patch is kept iff mean(mask_patch == 1) >= `rejection_rate`, in float32 —
training's rule (spec §3.2, §8.10, config.sampling.rejection_rate), which the reference's
abnormality analysis also applies. Counting is done on the host from the masks, so rejected
patches never reach the device.

Inputs as at test time (spec §5.2): the slice is not multiplied by the mask (spec §8.9); targets
100*(y/H, x/W) and slice position 100*z/D (`patches.window_targets`, `patches.slice_position`).

The forward. `p2l.heatmaps`' compiled forward reduces on the device to ||mu - t||^2 and
mean_d s_d, two floats back per patch of a 3.7 M-patch dense sweep; calibration needs each
coordinate's mean and log-variance, so this module compiles its own forward from the same parts
(`patches.extract_patches`, `model.apply(train=False)` on the position input, the ('data',) mesh
of p2l.parallel, the same static-batch rule and the same compute-dtype clone). The grid is P^2
(576) times smaller than the dense sweep, so four floats back per patch cost nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from p2l import heatmaps, parallel, patches
from p2l.errors import ConfigError, DataError


@dataclass(frozen=True)
class VolumeOutputs:
    """The kept patches of one volume, in (slice, y, x) order. Coordinates are (y, x)."""

    subject_id: str
    mean: np.ndarray  # (N, 2) float32 predicted location, 0-100 units
    logvar: np.ndarray  # (N, 2) float32 per-coordinate predicted log-variance s_d
    target: np.ndarray  # (N, 2) float32 true location 100*(y/H, x/W)
    brain_fraction: np.ndarray  # (N,) float32 mean(mask == 1) over the patch
    lesion_fraction: np.ndarray | None  # (N,) float32 mean(seg > 0); None without a seg
    slice_index: np.ndarray  # (N,) int32 z
    centre: np.ndarray  # (N, 2) int32 (y, x) patch centre
    grid_patches: int  # patches on the grid before rejection

    def __len__(self) -> int:
        return len(self.slice_index)


def grid_fractions(values_HxWxD: np.ndarray, patch: int) -> np.ndarray:
    """(D, Gy, Gx) float32: the fraction of each grid patch's P*P pixels where `values` is true.

    Pixels in the zero padding count as false, as training's window counts do (p2l.patches).
    """
    v = np.asarray(values_HxWxD, bool)
    h, w, _ = v.shape
    half = patch // 2
    ys, xs = patches.sliding_window_centres(h, w, patch)
    gy, gx = len(ys), len(xs)
    # Patch k along an axis is padded[k*P : (k+1)*P]; gy*P <= H + P - 1 <= H + 2*(P//2), so the
    # padded slice holds every patch and the grid is a block reshape.
    padded = np.pad(v.transpose(2, 0, 1), ((0, 0), (half, half), (half, half)))
    blocks = padded[:, : gy * patch, : gx * patch].reshape(-1, gy, patch, gx, patch)
    counts = blocks.sum(axis=(2, 4), dtype=np.int32)
    # An IEEE float32 quotient, as the reference's torch mean(mask_patch == 1): an exact tie
    # (count / P^2 == rate, e.g. 5/25 = 0.2; none for P = 24 at 0.2) is kept.
    return counts.astype(np.float32) / np.float32(patch * patch)


def kept_patches(mask_HxWxD, seg_HxWxD, patch: int, rejection_rate: float):
    """Grid patches with >= rejection_rate brain: (centres (N, 3) int32 z, y, x, brain fraction,
    lesion fraction or None, number of grid patches)."""
    mask = np.asarray(mask_HxWxD)
    h, w, _ = mask.shape
    brain = grid_fractions(mask == 1, patch)  # exactly 1, as training (spec §8.10)
    keep = brain >= np.float32(rejection_rate)
    z, iy, ix = np.nonzero(keep)
    ys, xs = patches.sliding_window_centres(h, w, patch)
    centres = np.stack([z, ys[iy], xs[ix]], axis=1).astype(np.int32)
    # Segs are binarised with > 0 (spec §2.2).
    lesion = None if seg_HxWxD is None else grid_fractions(np.asarray(seg_HxWxD) > 0, patch)[keep]
    return centres, brain[keep], lesion, int(brain.size)


class PendingOutputs:
    """A volume whose batches are dispatched; `result()` waits for them and assembles them."""

    def __init__(self, subject_id, outputs, counts, centres, brain, lesion, grid, shape):
        self._subject_id = subject_id
        self._outputs, self._counts = outputs, counts
        self._centres, self._brain, self._lesion = centres, brain, lesion
        self._grid, self._shape = grid, shape

    def result(self) -> VolumeOutputs:
        fetched = jax.device_get(self._outputs)
        self._outputs = []
        mean = [m[:c] for (m, _), c in zip(fetched, self._counts, strict=True)]
        logvar = [s[:c] for (_, s), c in zip(fetched, self._counts, strict=True)]
        empty = np.zeros((0, 2), np.float32)
        h, w, _ = self._shape
        z, y, x = self._centres.T
        target = np.asarray(patches.window_targets(y, x, h, w), np.float32).reshape(-1, 2)
        return VolumeOutputs(
            subject_id=self._subject_id,
            mean=np.concatenate(mean).astype(np.float32) if mean else empty,
            logvar=np.concatenate(logvar).astype(np.float32) if logvar else empty,
            target=target,
            brain_fraction=self._brain,
            lesion_fraction=self._lesion,
            slice_index=z.astype(np.int32),
            centre=self._centres[:, 1:].copy(),
            grid_patches=self._grid,
        )


class GridPredictor:
    """The model's outputs on the non-overlapping grid of volumes (module docstring).

    Args:
      model, variables: the Patch2Loc module and its eval-mode {"params", "batch_stats"}.
      patch: patch side P (training's `patches.patch_size_for`); also the grid's stride.
      rejection_rate: minimum brain fraction of a kept patch (config.sampling.rejection_rate).
      batch_size: patches per forward per local device (static shapes; the last batch padded).
      dtype: compute dtype, as `eval.dtype` ("float32", "bfloat16", "float16").
    """

    def __init__(self, model, variables, *, patch: int, rejection_rate: float = 0.2,
                 batch_size: int = 4096, dtype: str = "float32", devices=None):  # fmt: skip
        if str(dtype) not in heatmaps.DTYPES:
            raise ConfigError("eval.dtype", f"{dtype!r}; expected one of {list(heatmaps.DTYPES)}")
        if not 0.0 <= float(rejection_rate) <= 1.0:
            raise ConfigError("sampling.rejection_rate", f"must be in [0, 1], got {rejection_rate}")
        self.patch = heatmaps.positive_int(patch, "patch")
        self.batch_size = heatmaps.positive_int(batch_size, "eval.batch_size")
        self.rejection_rate = float(rejection_rate)
        self.dtype = str(dtype)
        self._devices = tuple(jax.local_devices() if devices is None else devices)
        self._repl = parallel.replicated(parallel.create_mesh(list(self._devices)))
        # Same clone as heatmaps.make_patch_forward: the compute dtype is the only change.
        model = model.clone(dtype=jnp.dtype(self.dtype))
        self._forward = heatmaps.compiled_forward(model, self.patch, self._devices, True)
        # Sent to the devices once for all volumes.
        self._variables = jax.device_put(heatmaps.local_variables(variables), self._repl)

    @classmethod
    def from_config(cls, config, model, variables) -> GridPredictor:
        """Patch side, rejection rate, batch size and dtype as training and evaluation use."""
        return cls(
            model,
            variables,
            patch=patches.patch_size_for(
                config.data.image_shape[0], config.sampling.patch_fraction
            ),
            rejection_rate=config.sampling.rejection_rate,
            batch_size=config.eval.batch_size,
            dtype=config.eval.dtype,
        )

    def describe(self) -> dict:
        return {"patch": self.patch, "stride": self.patch, "rejection_rate": self.rejection_rate,
                "dtype": self.dtype, "rejection_counts": "mask == 1"}  # fmt: skip

    def start(self, subject_id: str, image, mask, seg=None) -> PendingOutputs:
        """Dispatches one (H, W, D) volume and returns at once (JAX runs it asynchronously)."""
        vol, _ = heatmaps.check_volume(image, None, subject_id)
        for name, arr in (("mask", mask), ("seg", seg)):
            if arr is not None and np.shape(arr) != vol.shape:
                raise DataError(subject_id, f"{name} shape {np.shape(arr)} != image {vol.shape}")
        centres, brain, lesion, grid = kept_patches(mask, seg, self.patch, self.rejection_rate)
        d = vol.shape[2]
        outputs, counts = [], []
        if len(centres):
            padded = jax.device_put(
                patches.pad_slices(jnp.asarray(vol.transpose(2, 0, 1)), self.patch), self._repl
            )
            # 100*z/D in float64, then float32, as training and heatmaps (spec §3.1).
            position = patches.slice_position(np.arange(d), d).astype(np.float32)
            position = jax.device_put(position, self._repl)
            # The heatmaps' static-batch rule: few distinct shapes, so few compilations.
            batch = heatmaps.batch_for(len(centres), self.batch_size, len(self._devices))
            for start in range(0, len(centres), batch):
                chunk = centres[start : start + batch]
                counts.append(len(chunk))
                if len(chunk) < batch:  # pad with centre (0, 0, 0); dropped in result()
                    chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), 3), np.int32)])
                outputs.append(self._forward(self._variables, padded, position, chunk))
        return PendingOutputs(subject_id, outputs, counts, centres, brain, lesion, grid, vol.shape)

    def __call__(self, subject_id: str, image, mask, seg=None) -> VolumeOutputs:
        return self.start(subject_id, image, mask, seg).result()

    def stream(self, volumes: Iterable) -> Iterator[VolumeOutputs]:
        """Outputs of volumes with subject_id/image/mask/seg (e.g. slices_builder.VolumeRecord),
        in order; volume k+1 is dispatched before volume k is fetched, two are held at a time."""
        ahead = None
        for vol in volumes:
            started = self.start(vol.subject_id, vol.image, vol.mask, vol.seg)
            if ahead is not None:
                yield ahead.result()
            ahead = started
        if ahead is not None:
            yield ahead.result()
