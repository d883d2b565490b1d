"""A raw head scan prepared like the training data, and maps carried back onto its grid (issue 14).

`prepare_raw` runs spec §2.1 on one scan with the run's own settings (p2l.preparation.record):
reorient/resample to the working grid, skull stripping, affine registration to the run's atlas,
crop to the brain, N4. It keeps the registration's affine, so `PreparedScan.to_raw` carries any
map of the prepared (atlas-space, cropped) grid back onto the raw scan's voxel grid in one
resampling pass (`scipy.ndimage.affine_transform`, the composed voxel-to-voxel affine: no
intermediate grid, no second interpolation through the working grid).

Geometry is ITK's (ANTs reads the file), as everywhere in preparation; the raw file's NIfTI affine
(nibabel's, used to write the outputs) must agree with it, or the outputs would sit elsewhere in a
viewer than the maps were computed: DataError.

Sanity checks, each a DataError naming the file (issue 14, "bad input"): skull stripping's brain
volume (p2l.preparation.skull_strip), the registration's final similarity to the atlas, the share
of the atlas brain inside the scan's field of view.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import ants
import numpy as np
from scipy import ndimage

from p2l.errors import DataError
from p2l.preparation.ants_io import read_ants
from p2l.preparation.atlas import Atlas
from p2l.preparation.skull_strip import PLAUSIBLE_BRAIN_ML, QUALITY, hd_bet_command, skull_strip
from p2l.preparation.steps import (
    N4Params,
    RegistrationParams,
    crop_to_mask,
    n4_correct,
    register_to_atlas,
    remove_transform_files,
    reorient_resample,
    warp_to_atlas,
)

# Below this share of the atlas brain inside the scan's field of view the scan misses too much
# of the brain to be scored (a partial-coverage acquisition, a scan of another body part).
MIN_BRAIN_COVERAGE = 0.8
# Mattes mutual information (ANTs' sign: more negative = more similar) between the registered,
# skull-stripped scan and the atlas (2 mm MNI152) inside the atlas brain. Measured 2026-12-01:
# raw IXI-HH T1 heads -0.18 / -0.22 (atlas skull stripping), a WMH T1 head (3 mm slices) -0.13,
# HD-BET-stripped IXI002 T1 / T2 -0.33 / -0.27, MSLUB T1 / T2 -0.28 / -0.16; a WMH head whose
# neck-heavy field of view defeats the atlas skull stripping (brain 2146 ml, brain misplaced)
# -0.03. Above the limit the registration is taken as failed.
MAX_ATLAS_MI = -0.08
# sform/qform disagreement tolerated between ITK's and nibabel's reading of the header (mm).
_HEADER_ATOL_MM = 1e-2
_LPS = np.diag([-1.0, -1.0, 1.0])


def itk_ras_affine(image: ants.ANTsImage) -> np.ndarray:
    """The 4x4 voxel-to-world (RAS+, NIfTI convention) affine of an ANTs image."""
    direction = np.asarray(image.direction, dtype=float)
    linear = direction @ np.diag(np.asarray(image.spacing, dtype=float))
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ linear
    affine[:3, 3] = _LPS @ np.asarray(image.origin, dtype=float)
    return affine


def _voxel_to_lps(image: ants.ANTsImage) -> tuple[np.ndarray, np.ndarray]:
    direction = np.asarray(image.direction, dtype=float)
    return direction @ np.diag(np.asarray(image.spacing, dtype=float)), np.asarray(
        image.origin, dtype=float
    )


def read_affine_transform(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(M, offset) of an ITK affine transform file: x_moving = M @ x_fixed + offset (LPS mm)."""
    transform = ants.read_transform(path)
    params = np.asarray(transform.parameters, dtype=float)
    center = np.asarray(transform.fixed_parameters, dtype=float)
    matrix, translation = params[:9].reshape(3, 3), params[9:12]
    # ITK: T(x) = M (x - c) + c + t
    return matrix, center + translation - matrix @ center


@dataclass
class PreparedScan:
    """A raw scan after spec §2.1, with what is needed to map results back onto its grid."""

    image: ants.ANTsImage  # N4-corrected, cropped, on the atlas grid (RAI)
    mask: ants.ANTsImage  # brain mask on the same grid (linear warp, fractional border)
    raw_shape: tuple[int, int, int]
    raw_affine: np.ndarray  # the raw file's NIfTI affine (outputs are written with it)
    # Voxel (prepared grid) <- voxel (raw grid): prepared_index = K @ raw_index + k.
    raw_to_prepared: tuple[np.ndarray, np.ndarray]
    skull_strip: dict
    checks: dict
    steps: list[dict] = field(default_factory=list)
    raw_image: np.ndarray | None = None  # the raw voxels as read (for the overlay: no second read)

    def to_raw(self, array: np.ndarray, kind: str = "map") -> np.ndarray:
        """`array` (on the prepared grid) resampled onto the raw scan's grid; 0 outside the crop.

        kind "map": linear interpolation; "mask": linear, then >= 0.5 (volume-preserving, as the
        pipeline carries masks)."""
        if tuple(array.shape) != tuple(self.image.shape):
            raise ValueError(f"array shape {array.shape} is not the prepared {self.image.shape}")
        matrix, offset = self.raw_to_prepared
        values = np.asarray(array, dtype=np.float32)
        if kind == "mask":
            values = (values > 0).astype(np.float32)
        out = ndimage.affine_transform(
            values, matrix, offset=offset, output_shape=self.raw_shape, order=1, cval=0.0
        )
        return (out >= 0.5).astype(np.uint8) if kind == "mask" else out.astype(np.float32)


class _Steps:
    """Seconds per step, for the report; `log` (if given) hears of each step as it ends."""

    def __init__(self, log=None) -> None:
        self.steps: list[dict] = []
        self.log = log

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.steps.append({"name": name, "seconds": round(time.perf_counter() - start, 2)})
        if self.log is not None:
            self.log(f"p2l.detect: {name} done ({self.steps[-1]['seconds']:.1f} s)")
        return out


def looks_skull_stripped(image: ants.ANTsImage) -> bool:
    """A zero background around a brain-sized non-zero region (a raw head's non-zero voxels, skull
    and scalp and noise, make several litres)."""
    data = image.numpy()
    nonzero_ml = float(np.count_nonzero(data)) * float(np.prod(image.spacing)) / 1000.0
    lo, hi = PLAUSIBLE_BRAIN_ML
    return float(np.mean(data == 0)) >= 0.3 and lo <= nonzero_ml <= hi


def choose_skull_strip(requested: str, raw: ants.ANTsImage) -> str:
    """auto: none for a scan that is already skull-stripped, else HD-BET when its command is
    installed (the reference's tool), else the offline atlas method (lower quality, named in
    every output)."""
    if requested != "auto":
        return requested
    if looks_skull_stripped(raw):
        return "none"
    return "hd-bet" if hd_bet_command() is not None else "atlas"


def prepare_raw(
    path: str | Path,
    record: dict,
    atlas: Atlas,
    *,
    skull_strip_method: str = "auto",
    brain_mask: str | Path | None = None,
    log=None,
) -> PreparedScan:
    """Spec §2.1 on the raw scan at `path` with the run's settings `record`; see the module doc.
    `log(line)` reports each step as it ends (minutes for a 1 mm head)."""
    import nibabel as nib

    source = str(path)
    steps = _Steps(log)
    raw = steps.run("read", read_ants, path, "image")  # unreadable / truncated / NaN / not 3-D
    header = nib.load(str(path))
    raw_affine = np.asarray(header.affine, dtype=float)
    gap = float(np.max(np.abs(itk_ras_affine(raw) - raw_affine)))
    if gap > _HEADER_ATOL_MM:
        raise DataError(
            source,
            f"the header's sform and qform disagree (by up to {gap:.3g} mm): ITK and NIfTI "
            "viewers would place the scan differently; fix the header (e.g. fslorient "
            "-copysform2qform)",
        )
    spacing = float(record["spacing_mm"])
    method = choose_skull_strip(skull_strip_method, raw)
    given = None
    if brain_mask is not None:
        method = "given-mask"
        given = _given_mask(brain_mask, raw, source)

    resampled, _ = steps.run(
        "reorient_resample", reorient_resample, raw, "image", spacing, reorient_first=True
    )
    if given is not None:
        given, _ = reorient_resample(given, "mask", spacing, reorient_first=True)
    registration = RegistrationParams(**_tuples(record["registration"]))
    stripped, brain, strip_info = steps.run(
        "skull_strip",
        skull_strip,
        resampled,
        method,
        atlas,
        source=source,
        registration=registration,
        hd_bet_args=record.get("hd_bet_args", "") if method == "hd-bet" else "",
        given_mask=given,
        given_note=f"--brain-mask {brain_mask}" if given is not None else "",
    )
    warped, transforms = steps.run("register", register_to_atlas, stripped, atlas, registration)
    try:
        matrix, offset = read_affine_transform(transforms[0])
        mask_atlas = warp_to_atlas(brain, atlas, transforms)
    finally:
        remove_transform_files(transforms)
    checks = _registration_checks(warped, atlas, raw, matrix, offset, source)

    start = time.perf_counter()
    cropped, _ = crop_to_mask(
        {"image": warped, "mask": mask_atlas}, mask_atlas, record.get("crop_mode", "reference")
    )
    steps.steps.append({"name": "crop", "seconds": round(time.perf_counter() - start, 2)})
    n4 = N4Params(**_tuples(record["n4"]))
    corrected = steps.run("n4", n4_correct, cropped["image"], cropped["mask"], n4)
    if not np.all(np.isfinite(corrected.numpy())):
        raise DataError(source, "bias-field correction produced non-finite values")

    strip_info = {k: strip_info[k] for k in ("method", "quality", "brain_ml")}
    strip_info["quality"] = QUALITY.get(method, strip_info["quality"])
    return PreparedScan(
        image=corrected,
        mask=cropped["mask"],
        raw_shape=tuple(int(n) for n in raw.shape),  # type: ignore[arg-type]
        raw_affine=raw_affine,
        raw_to_prepared=_raw_to_prepared(raw, corrected, matrix, offset),
        skull_strip=strip_info,
        checks=checks,
        steps=steps.steps,
        raw_image=raw.numpy(),
    )


def _tuples(settings: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


def _given_mask(path, raw: ants.ANTsImage, source: str) -> ants.ANTsImage:
    mask = read_ants(path, "image")
    problems = []
    if tuple(mask.shape) != tuple(raw.shape):
        problems.append(f"shape {tuple(mask.shape)} vs {tuple(raw.shape)}")
    elif float(np.max(np.abs(itk_ras_affine(mask) - itk_ras_affine(raw)))) > _HEADER_ATOL_MM:
        problems.append("a different voxel-to-world affine")
    if problems:
        raise DataError(path, f"brain mask is not on the grid of the scan {source}: {problems[0]}")
    return mask.new_image_like((mask.numpy() > 0).astype(np.float32))


def _raw_to_prepared(raw, prepared, matrix: np.ndarray, offset: np.ndarray):
    """Voxel affine raw -> prepared: raw index -> LPS point q -> atlas point p = T^-1(q) ->
    prepared index."""
    a_raw, o_raw = _voxel_to_lps(raw)
    a_prep, o_prep = _voxel_to_lps(prepared)
    inv_m = np.linalg.inv(matrix)
    inv_prep = np.linalg.inv(a_prep)
    linear = inv_prep @ inv_m @ a_raw
    shift = inv_prep @ (inv_m @ (o_raw - offset) - o_prep)
    return linear, shift


def _registration_checks(warped, atlas: Atlas, raw, matrix, offset, source: str) -> dict:
    """Final similarity to the atlas, correlation (contrast sign), field-of-view coverage."""
    brain = atlas.brain_mask.numpy() > 0
    mi = float(
        ants.image_similarity(
            atlas.image,
            warped,
            metric_type="MattesMutualInformation",
            fixed_mask=atlas.brain_mask,
            moving_mask=atlas.brain_mask,
        )
    )
    a, b = atlas.image.numpy()[brain], warped.numpy()[brain]
    correlation = float(np.corrcoef(a, b)[0, 1]) if b.std() > 0 else 0.0
    # Atlas brain voxels -> raw voxel indices: inside the raw grid?
    index = np.argwhere(brain)[:: max(1, int(brain.sum()) // 200_000)].astype(float)
    a_atlas, o_atlas = _voxel_to_lps(atlas.image)
    points = index @ a_atlas.T + o_atlas
    in_scan = points @ matrix.T + offset
    a_raw, o_raw = _voxel_to_lps(raw)
    raw_index = (in_scan - o_raw) @ np.linalg.inv(a_raw).T
    shape = np.asarray(raw.shape, dtype=float)
    inside = np.all((raw_index >= -0.5) & (raw_index <= shape - 0.5), axis=1)
    coverage = float(inside.mean())
    checks = {
        "atlas_mutual_information": round(mi, 4),
        "atlas_correlation": round(correlation, 4),
        "brain_in_field_of_view": round(coverage, 4),
        "affine_determinant": round(float(np.linalg.det(matrix)), 4),
    }
    if coverage < MIN_BRAIN_COVERAGE:
        raise DataError(
            source,
            f"the field of view holds only {coverage:.0%} of the brain (after registration to "
            f"the atlas; at least {MIN_BRAIN_COVERAGE:.0%} needed): a partial scan cannot be "
            "scored",
        )
    if not mi <= MAX_ATLAS_MI:
        raise DataError(
            source,
            f"registration to the atlas failed: final mutual information {mi:.3f} (real heads "
            f"give -0.12 or lower, limit {MAX_ATLAS_MI}); is this a brain MRI? With the atlas "
            "skull stripping, a field of view with much neck can mislead it: install HD-BET",
        )
    return checks
