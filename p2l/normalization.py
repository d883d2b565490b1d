"""Load-time intensity normalisation and centred crop/pad of spec §2.2, in the reference's order.

The reference (`src/datamodules/create_dataset.py`) reads every volume with SimpleITK, smooths
intensity images with CurvatureFlow, then applies the torchio pipeline
HistogramStandardization -> CropOrPad((192, 192, 100)) -> RescaleIntensity((0, 1), (1, 99), 'mask').
Each step below reproduces the torchio semantics with numpy, without depending on torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from p2l.errors import ConfigError, DataError
from p2l.orientation import Reorientation
from p2l.volume_io import Volume, check_same_grid, read_volume

Shape3 = tuple[int, int, int]


def curvature_flow(
    image: np.ndarray,
    spacing: tuple[float, float, float] | np.ndarray,
    time_step: float = 0.125,
    iterations: int = 3,
) -> np.ndarray:
    """`sitk.CurvatureFlow` on an (i, j, k) array, equal to the reference's `sitk_reader`.

    The reference filters the image as read by `sitk.ReadImage` (array order (k, j, i), spacing from
    the file) and then transposes (2, 1, 0); ITK scales its derivatives by the spacing, so the
    spacing must be set here too (spec §2.2). Direction and origin do not affect the filter.
    Returns float64, the filter's output type, as in the reference (Nyúl casts to float32 next).
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"curvature_flow expects a 3-D array, got shape {array.shape}")
    sitk_image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    sitk_image.SetSpacing(tuple(float(s) for s in spacing))
    smoothed = sitk.CurvatureFlow(
        image1=sitk_image, timeStep=float(time_step), numberOfIterations=int(iterations)
    )
    return np.ascontiguousarray(sitk.GetArrayFromImage(smoothed).transpose(2, 1, 0))


# Nyúl landmarks of the reference (`landmarks/{t1,t2}_landmarks.pt`, spec §2.2), at the image
# percentiles _NYUL_PERCENTILES. Leading zeros: they were trained on whole volumes with background.
# fmt: off
NYUL_LANDMARKS: dict[str, np.ndarray] = {
    "t1": np.array(
        [0, 0, 0, 0, 0, 0, 2.20984358e-04, 43.8263515, 71.3186445, 77.0941910, 82.3987155,
         92.9124072, 100],
        dtype=np.float64,
    ),
    "t2": np.array(
        [0, 0, 0, 0, 0, 0, 0, 28.40980097, 33.61393061, 35.95591622, 38.93988528, 50.63005071,
         100],
        dtype=np.float64,
    ),
}
# fmt: on
for _landmarks in NYUL_LANDMARKS.values():
    _landmarks.setflags(write=False)

# torchio `_get_percentiles((1, 99))`: the cutoffs, quartiles and deciles, sorted.
_NYUL_PERCENTILES = np.array([1.0, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 99])
# torchio `_normalize` skips the 25th and 75th percentiles.
_NYUL_RANGE_TO_USE = [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]
_NYUL_EPSILON = 1e-5


def histogram_standardize(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Nyúl piecewise-linear standardisation of the whole volume (no mask), spec §2.2.

    Same arithmetic as torchio's `_normalize`
    (TorchIO-project/torchio `src/torchio/transforms/preprocessing/intensity/
    histogram_standardization.py`): image percentiles map onto the landmarks, segments whose
    percentile gap is < 1e-5 get slope 0 (their intercept is the landmark), and values beyond the
    outer percentiles are extrapolated with the first / last segment.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != _NYUL_PERCENTILES.shape:
        raise ValueError(f"expected {_NYUL_PERCENTILES.size} landmarks, got {landmarks.shape}")
    array = np.asarray(image)
    shape = array.shape
    data = array.reshape(-1).astype(np.float32)
    percentile_values = np.percentile(data, _NYUL_PERCENTILES)

    range_mapping = landmarks[_NYUL_RANGE_TO_USE]
    range_perc = percentile_values[_NYUL_RANGE_TO_USE]
    diff_mapping = np.diff(range_mapping)
    diff_perc = np.diff(range_perc)
    # Background makes several low percentiles equal: dividing by inf gives those segments slope 0.
    diff_perc[diff_perc < _NYUL_EPSILON] = np.inf

    slopes = diff_mapping / diff_perc
    intercepts = range_mapping[:-1] - slopes * range_perc[:-1]
    bin_id = np.digitize(data, range_perc[1:-1], right=False)
    standardized = slopes[bin_id] * data + intercepts[bin_id]
    return standardized.reshape(shape).astype(np.float32)


def _split_difference(n: int) -> tuple[int, int]:
    # torchio CropOrPad._get_six_bounds_parameters: the odd voxel goes to the start (ceil, floor).
    return math.ceil(n / 2), math.floor(n / 2)


@dataclass(frozen=True)
class CropPad:
    """Centred crop/pad between two grids with torchio `CropOrPad` semantics (spec §2.2).

    Per axis the difference is split ceil/floor between start and end (torchio
    `src/torchio/transforms/preprocessing/spatial/crop_or_pad.py`); padding is with zeros.
    """

    source_shape: Shape3
    target_shape: Shape3
    pad_before: Shape3
    pad_after: Shape3
    crop_before: Shape3
    crop_after: Shape3

    @classmethod
    def between(cls, source_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> CropPad:
        """The crop/pad that maps `source_shape` onto `target_shape` around the centre."""
        source = tuple(int(n) for n in source_shape)
        target = tuple(int(n) for n in target_shape)
        if len(source) != 3 or len(target) != 3 or min(source + target) < 1:
            raise ValueError(f"need two 3-D positive shapes, got {source_shape}, {target_shape}")
        pads = [_split_difference(max(t - s, 0)) for s, t in zip(source, target, strict=True)]
        crops = [_split_difference(max(s - t, 0)) for s, t in zip(source, target, strict=True)]
        return cls(
            source_shape=source,  # type: ignore[arg-type]
            target_shape=target,  # type: ignore[arg-type]
            pad_before=tuple(p[0] for p in pads),  # type: ignore[arg-type]
            pad_after=tuple(p[1] for p in pads),  # type: ignore[arg-type]
            crop_before=tuple(c[0] for c in crops),  # type: ignore[arg-type]
            crop_after=tuple(c[1] for c in crops),  # type: ignore[arg-type]
        )

    def _source_slices(self) -> tuple[slice, ...]:
        return tuple(
            slice(b, n - a)
            for b, a, n in zip(self.crop_before, self.crop_after, self.source_shape, strict=True)
        )

    def _target_slices(self) -> tuple[slice, ...]:
        return tuple(
            slice(b, n - a)
            for b, a, n in zip(self.pad_before, self.pad_after, self.target_shape, strict=True)
        )

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Source-grid array (extra trailing axes allowed) -> target grid, zero padded."""
        array = np.asarray(array)
        if array.shape[:3] != self.source_shape:
            raise ValueError(f"expected shape {self.source_shape}, got {array.shape[:3]}")
        out = np.zeros(self.target_shape + array.shape[3:], dtype=array.dtype)
        out[self._target_slices()] = array[self._source_slices()]
        return out

    def invert(self, array: np.ndarray, fill: float = 0) -> np.ndarray:
        """Target-grid array -> source grid; voxels that were cropped away get `fill`."""
        array = np.asarray(array)
        if array.shape[:3] != self.target_shape:
            raise ValueError(f"expected shape {self.target_shape}, got {array.shape[:3]}")
        out = np.full(self.source_shape + array.shape[3:], fill, dtype=array.dtype)
        out[self._source_slices()] = array[self._target_slices()]
        return out

    def target_affine(self, source_affine: np.ndarray) -> np.ndarray:
        """Affine of the target grid: voxel 0 of the target is source voxel crop - pad."""
        source_affine = np.asarray(source_affine, dtype=np.float64)
        offset = np.array(self.crop_before, np.float64) - np.array(self.pad_before, np.float64)
        affine = source_affine.copy()
        affine[:3, 3] = source_affine[:3, :3] @ offset + source_affine[:3, 3]
        return affine


def rescale_intensity(
    image: np.ndarray,
    mask: np.ndarray,
    percentiles: tuple[float, float] = (1, 99),
    *,
    source: str | os.PathLike = "<array>",
) -> np.ndarray:
    """torchio `RescaleIntensity((0, 1), percentiles, masking_method=mask)`, spec §2.2 step 3.

    Percentiles of the voxels with mask > 0, clip the whole image to them, then map the clipped
    array's min/max to [0, 1] (torchio `.../intensity/rescale.py`, in float32 like torchio).
    Raises DataError naming `source` where torchio only warns: an empty mask or a constant image.
    """
    array = np.array(image, dtype=np.float32)  # copy: the operations below are in place
    mask = np.asarray(mask)
    if mask.shape != array.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {array.shape}")
    inside = mask > 0
    if not inside.any():
        raise DataError(source, "cannot rescale intensities: the brain mask has no voxel > 0")
    cutoff = np.percentile(array[inside], percentiles)
    np.clip(array, *cutoff, out=array)
    in_min, in_max = array.min(), array.max()
    in_range = in_max - in_min
    if in_range == 0:
        raise DataError(source, "cannot rescale intensities: all values inside the mask are equal")
    array -= in_min
    array /= in_range
    return array


@dataclass
class Subject:
    """One normalised scan on the target grid (spec §2.2), plus what is needed to map back."""

    image: np.ndarray  # (H, W, D) float32 in [0, 1]
    mask: np.ndarray  # (H, W, D) float32, fractional border values kept
    seg: np.ndarray | None  # (H, W, D) uint8 = seg > 0, or None
    subject_id: str
    affine: np.ndarray  # 4x4 affine of the target grid
    crop_pad: CropPad  # between the reoriented scan and the target grid
    source_affine: np.ndarray  # the scan's own (stored) grid
    source_shape: Shape3
    image_path: str
    reorientation: Reorientation | None = None  # stored grid -> training orientation

    def to_source(self, array: np.ndarray, fill: float = 0) -> np.ndarray:
        """Target-grid map -> the scan's own stored grid (undo crop/pad, then reorientation)."""
        back = self.crop_pad.invert(array, fill=fill)
        return back if self.reorientation is None else self.reorientation.invert(back)


_SPACING_TOLERANCE = 1e-3


def load_subject(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    seg_path: str | os.PathLike | None,
    *,
    modality: str,
    subject_id: str,
    target_shape: tuple[int, int, int] = (192, 192, 100),
    expected_spacing: float | None = 1.0,
    orientation: Sequence[str] | None = None,
    check_oblique: bool = True,
    spacing: Sequence[float] | None = None,
) -> Subject:
    """Read one scan (+ mask, seg) and normalise it exactly as the reference loader, spec §2.2.

    Order: CurvatureFlow (image only) -> Nyúl on the un-cropped volume -> centred crop/pad of
    image, mask and seg -> rescale to [0, 1] from the p1/p99 inside mask > 0. With `orientation`
    (axis codes, e.g. the run's training space) the scan is first brought to it; see
    `prepare_subject`.
    """
    key = modality.lower()
    if key not in NYUL_LANDMARKS:
        raise ConfigError("modality", f"unknown modality {modality!r}; expected 't1' or 't2'")
    target = tuple(target_shape)
    if len(target) != 3 or not all(isinstance(n, int | np.integer) and n > 0 for n in target):
        raise ConfigError("target_shape", f"expected 3 positive integers, got {target_shape!r}")

    image = read_volume(image_path, kind="image")
    mask = read_volume(mask_path, kind="mask")
    seg = None if seg_path is None else read_volume(seg_path, kind="seg")
    return prepare_subject(
        image,
        mask,
        seg,
        modality=key,
        subject_id=subject_id,
        target_shape=target,
        expected_spacing=expected_spacing,
        orientation=orientation,
        check_oblique=check_oblique,
        spacing=spacing,
    )


def prepare_subject(
    image: Volume,
    mask: Volume,
    seg: Volume | None,
    *,
    modality: str,
    subject_id: str,
    target_shape: tuple[int, int, int] = (192, 192, 100),
    expected_spacing: float | None = 1.0,
    orientation: Sequence[str] | None = None,
    check_oblique: bool = True,
    spacing: Sequence[float] | None = None,
) -> Subject:
    """The normalisation chain of `load_subject` on volumes already in memory (spec §2.2).

    `orientation`: axis codes (e.g. ("L", "P", "S")) to bring the scan to before anything else,
    by an exact axis permutation/flip (`orientation.Reorientation`): the crop/pad of spec §2.2
    works in voxel space and the network sees the array layout, so the same scan stored another
    way would otherwise give another result. `spacing`: the per-axis voxel size (mm) expected after
    that reorientation (the training data's). `check_oblique`: refuse a scan whose axes are tilted
    from the world axes (a single scan to detect on); a dataset's own volumes, which the reference
    never checks, are reoriented without it. `Subject.to_source` maps results back.
    """
    key = modality.lower()
    if key not in NYUL_LANDMARKS:
        raise ConfigError("modality", f"unknown modality {modality!r}; expected 't1' or 't2'")
    target = tuple(target_shape)
    image_path, mask_path = image.path, mask.path
    check_same_grid(image, mask)
    if seg is not None:
        check_same_grid(image, seg)
    source_affine, source_shape = image.affine, image.shape
    reorientation = None
    if orientation is not None:
        reorientation = Reorientation.between(
            image.affine, image.shape, orientation, source=image_path, check_oblique=check_oblique
        )
        image, mask = _reoriented(image, reorientation), _reoriented(mask, reorientation)
        seg = None if seg is None else _reoriented(seg, reorientation)
    # Checked after reorientation: the per-axis spacing is that of the training axes.
    _check_spacing(image, expected_spacing, spacing)

    smoothed = curvature_flow(image.data, image.spacing)
    # Nyúl before cropping: the reference computes the percentiles on the cut volume (spec §2.2).
    standardized = histogram_standardize(smoothed, NYUL_LANDMARKS[key])
    crop_pad = CropPad.between(image.shape, target)
    image_t = crop_pad.apply(standardized)
    mask_t = crop_pad.apply(mask.data)
    seg_t = None if seg is None else crop_pad.apply((seg.data > 0).astype(np.uint8))
    if not np.any(mask_t > 0):
        raise DataError(
            mask_path, f"brain mask has no voxel > 0 inside the centred {target} crop of the scan"
        )
    rescaled = rescale_intensity(image_t, mask_t, source=image_path)
    return Subject(
        image=rescaled,
        mask=mask_t,
        seg=seg_t,
        subject_id=subject_id,
        affine=crop_pad.target_affine(image.affine),
        crop_pad=crop_pad,
        source_affine=source_affine,
        source_shape=source_shape,
        image_path=str(Path(image_path)),
        reorientation=reorientation,
    )


def _reoriented(volume: Volume, reorientation: Reorientation) -> Volume:
    return Volume(reorientation.apply(volume.data), reorientation.target_affine, volume.path)


def _check_spacing(
    image: Volume, isotropic: float | None, per_axis: Sequence[float] | None
) -> None:
    actual = np.array(image.spacing)
    shown = tuple(round(float(s), 4) for s in actual)
    if isotropic is not None and np.any(np.abs(actual - isotropic) > _SPACING_TOLERANCE):
        raise DataError(
            image.path,
            f"voxel spacing {shown} mm, expected {isotropic:g} mm isotropic: preprocess the "
            "volume with data_prep first (resampling and registration, spec §2.1)",
        )
    if per_axis is not None and np.any(np.abs(actual - np.asarray(per_axis)) > _SPACING_TOLERANCE):
        raise DataError(
            image.path,
            f"voxel spacing {shown} mm along the training axes, the model was trained on "
            f"{tuple(float(s) for s in per_axis)} mm: resample the volume (spec §2.1 step 1)",
        )
