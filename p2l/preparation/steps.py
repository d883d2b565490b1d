"""The preprocessing steps of the reference pipeline (spec §2.1), one function each, on ANTs images.

Order per scan: `reorient_resample` -> skull stripping (`p2l.preparation.skull_strip`) ->
`register_to_atlas` + `warp_to_atlas` -> `crop_to_mask` -> `n4_correct`. Parameters default to the
reference scripts' values; each step returns what it did so the manifest can record it.

Interpolation, stated once:
- images: B-spline (ANTs interp_type 4) when resampling to the working grid (1 mm, or `--spacing`),
  linear when warped to the atlas
  (the reference keeps ANTs' `warpedmovout`, which is linear);
- brain masks: linear warp, fractional border values kept as the reference writes them;
- segmentations: binarised first (label > 0, see `binarise_labels`), warped linearly in one step
  from native to atlas space, then binarised again with > 0 (the loader's rule, spec §2.2): the
  same voxels the reference marks, since it applies > 0 to the linearly warped label map
  (`binarise_warped_seg` can instead keep fraction >= 0.5, which preserves lesion volume);
- `reorient_resample` of a mask/seg on its own (step CLI only): linear, then >= 0.5, which keeps
  the volume; the pipeline never needs it (segs travel straight from native space to the atlas).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

import ants
import numpy as np
from ants import config as ants_config

from p2l.preparation.atlas import ORIENTATION, Atlas

CropMode = Literal["reference", "inclusive"]
_BSPLINE, _LINEAR = 4, 0  # ants.resample_image interp_type codes
_SPACING_ATOL = 1e-3


@dataclass(frozen=True)
class RegistrationParams:
    """`ants.registration` settings; defaults = the reference (`type_of_transform='Affine'`).

    The iteration/shrink/smoothing values are ANTsPy 0.6's defaults for 'Affine', written out so the
    manifest records them and tests can run fewer iterations. Mattes mutual information, 32 bins,
    20 % random sampling as ANTsPy's defaults; `random_seed` makes the sampling repeatable.
    """

    type_of_transform: str = "Affine"
    aff_iterations: tuple[int, ...] = (2100, 1200, 1200, 10)
    aff_shrink_factors: tuple[int, ...] = (6, 4, 2, 1)
    aff_smoothing_sigmas: tuple[float, ...] = (3, 2, 1, 0)
    random_seed: int = 3141

    def as_dict(self) -> dict:
        """Plain-JSON form for the manifest."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def with_iterations(cls, iterations: tuple[int, ...], random_seed: int = 3141):
        """The reference schedule cut to `len(iterations)` levels, coarsest first (fewer levels
        skip the finest, slowest ones: used by tests)."""
        default = cls()
        levels = len(iterations)
        if not 1 <= levels <= len(default.aff_iterations):
            raise ValueError(
                f"expected 1 to {len(default.aff_iterations)} iteration counts (one per level, "
                f"coarsest first), got {list(iterations)}"
            )
        return cls(
            aff_iterations=tuple(int(i) for i in iterations),
            aff_shrink_factors=default.aff_shrink_factors[:levels],
            aff_smoothing_sigmas=default.aff_smoothing_sigmas[:levels],
            random_seed=random_seed,
        )


@dataclass(frozen=True)
class N4Params:
    """N4 settings of the reference `n4filter.py`: 4 x 200 iterations, tol 5e-4, weight = mask
    smoothed with sigma 1."""

    iters: tuple[int, ...] = (200, 200, 200, 200)
    tol: float = 0.0005
    shrink_factor: int = 4
    weight_mask_sigma: float = 1.0

    def as_dict(self) -> dict:
        """Plain-JSON form for the manifest."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def is_isotropic_1mm(image: ants.ANTsImage) -> bool:
    """True when every voxel side is 1 mm (within 1e-3)."""
    return is_isotropic(image, 1.0)


def is_isotropic(image: ants.ANTsImage, spacing: float) -> bool:
    """True when every voxel side is `spacing` mm (within 1e-3)."""
    return bool(np.allclose(image.spacing, spacing, atol=_SPACING_ATOL))


def reorient_resample(
    image: ants.ANTsImage,
    kind: Literal["image", "mask", "seg"] = "image",
    spacing: float = 1.0,
    reorient_first: bool = False,
) -> tuple[ants.ANTsImage, dict]:
    """Resample to `spacing` mm isotropic (if not already) and reorient to RAI, spec §2.1 step 1.

    `spacing` is the working grid: 1 mm as the reference, or coarser (`--spacing 2`) for data that
    only exists at 2 mm. Images: B-spline as `resample.py`. Masks / binary segs: linear then >= 0.5
    (volume-preserving). The reference resampled even 1 mm scans (its `list != tuple` test is
    always true); on the target grid that is an identity up to B-spline round-off, so it is skipped.
    A mask or seg that needs no resampling is returned as given (binarise it first).

    `reorient_first` (p2l.detect's raw scans): reorient (an exact axis permutation/flip), then
    resample, so the working grid, and everything after it, is the same however the scan's axes
    are stored; data_prep keeps the reference's order (resample, then reorient), whose grid
    starts at the stored first voxel.
    """
    info = {"input_spacing": [round(float(s), 6) for s in image.spacing], "resampled": False}
    out = _rounded_geometry(image.reorient_image2(ORIENTATION)) if reorient_first else image
    if not is_isotropic(image, spacing):
        interp = _BSPLINE if kind == "image" else _LINEAR
        source = out if kind == "image" else (out > 0).astype("float32")
        target = (float(spacing),) * 3
        out = ants.resample_image(source, target, use_voxels=False, interp_type=interp)
        if kind != "image":
            out = (out >= 0.5).astype("float32")
        info.update(resampled=True, interpolation="bspline" if kind == "image" else "linear>=0.5")
    out = out.reorient_image2(ORIENTATION)
    info["orientation"] = ORIENTATION
    return out, info


def _rounded_geometry(image: ants.ANTsImage) -> ants.ANTsImage:
    """`image` with origin rounded to 1e-4 mm and direction cosines to 1e-6. Two storage orders of
    one scan reorient to the same voxels but to origins that differ in float32 round-off (3e-6 mm
    measured), and the affine registration amplifies that into different optima (brain masks of
    1103 and 1097 ml): rounded, both are bit-identical and so is everything after."""
    out = image.clone()
    out.set_origin(tuple(float(v) for v in np.round(np.asarray(image.origin, dtype=float), 4)))
    out.set_direction(np.round(np.asarray(image.direction, dtype=float), 6))
    return out


def shift_to_positive(
    image: ants.ANTsImage, mask: ants.ANTsImage, floor_fraction: float = 0.01
) -> tuple[ants.ANTsImage, dict]:
    """Brain intensities of a z-scored source shifted so their minimum is a small positive value
    (`floor_fraction` of the brain's intensity range); 0 outside `mask > 0`.

    N4 models a multiplicative bias field and needs positive intensities; z-scored sources (the
    BraTS 2015 deepmedic examples, `*_subtrMeanDivStd`) are negative in about half the brain and
    their background holds the brain's minimum, not 0. A deviation from spec §2.1, whose sources
    are raw scanner intensities; the shift is recorded in the manifest.
    """
    data = image.numpy().astype(np.float64)
    inside = mask.numpy() > 0
    if not inside.any():
        raise ValueError("cannot shift intensities: the brain mask is empty")
    low, high = float(data[inside].min()), float(data[inside].max())
    floor = floor_fraction * max(high - low, 1e-6)
    offset = floor - low
    shifted = np.where(inside, data + offset, 0.0).astype(np.float32)
    info = {"offset": round(offset, 6), "brain_min_before": round(low, 6)}
    return image.new_image_like(shifted), info


def brain_mask_from_stripped(image: ants.ANTsImage) -> ants.ANTsImage:
    """Mask of an already skull-stripped scan: `ants.get_mask` defaults, as `get_mask.py` (BraTS).

    Threshold at the image mean, erode 2, largest component, dilate 2, fill holes.
    """
    return ants.get_mask(image).astype("float32")


def register_to_atlas(
    moving: ants.ANTsImage, atlas: Atlas, params: RegistrationParams
) -> tuple[ants.ANTsImage, list[str]]:
    """Affine registration of a skull-stripped scan to the atlas, spec §2.1 step 3.

    Returns the scan on the atlas grid (linear interpolation, ANTs' `warpedmovout`) and the
    forward transform files to carry masks and segmentations with `warp_to_atlas`.
    """
    # ANTsPy passes its module-level seed to antsRegistration; the public setter also sets numpy's
    # global seed, which nothing here relies on. on=False keeps multi-threading.
    ants_config.set_ants_deterministic(on=False, seed_value=int(params.random_seed))
    result = ants.registration(
        fixed=atlas.image,
        moving=moving,
        type_of_transform=params.type_of_transform,
        aff_iterations=tuple(params.aff_iterations),
        aff_shrink_factors=tuple(params.aff_shrink_factors),
        aff_smoothing_sigmas=tuple(params.aff_smoothing_sigmas),
    )
    return result["warpedmovout"].clone("float"), list(result["fwdtransforms"])


def affine_summary(transforms: list[str]) -> dict:
    """The affine of a registration for the manifest: 3x4 matrix (atlas -> scan, ITK convention)
    and its determinant, the scan's volume per atlas volume (a lesion of V mm³ in the scan covers
    about V / det mm³ of atlas space: V / det voxels on the 1 mm grid)."""
    transform = ants.read_transform(transforms[0])
    params = np.asarray(transform.parameters, dtype=float)
    matrix = params[:9].reshape(3, 3)
    return {
        "matrix": np.round(matrix, 6).tolist(),
        "translation": np.round(params[9:12], 4).tolist(),
        "center": np.round(np.asarray(transform.fixed_parameters, dtype=float), 4).tolist(),
        "determinant": round(float(np.linalg.det(matrix)), 6),
    }


def remove_transform_files(*results: dict | list[str]) -> None:
    """Delete the temporary transform files ANTs wrote (one pair per registration)."""
    for result in results:
        files = (
            result
            if isinstance(result, list)
            else (list(result.get("fwdtransforms", [])) + list(result.get("invtransforms", [])))
        )
        for name in files:
            if isinstance(name, str) and os.path.isfile(name):
                os.unlink(name)


def warp_to_atlas(volume: ants.ANTsImage, atlas: Atlas, transforms: list[str]) -> ants.ANTsImage:
    """Carry a brain mask or binary segmentation to the atlas grid with linear interpolation.

    Returns fractional values in [0, 1]: masks are kept so, as the reference writes them
    (`registration.py`); segmentations then go through `binarise_warped_seg`.
    """
    warped = ants.apply_transforms(
        fixed=atlas.image,
        moving=volume.clone("float"),
        transformlist=transforms,
        interpolator="linear",
    )
    # Linear weights are convex, so values stay in [0, 1] up to float round-off: clamp that.
    return warped.new_image_like(np.clip(warped.numpy(), 0.0, 1.0).astype(np.float32))


def binarise_warped_seg(warped: ants.ANTsImage, threshold: float = 0.0) -> ants.ANTsImage:
    """Linearly warped lesion mask -> binary.

    threshold 0 (default): the loader's `seg > 0` rule (spec §2.2), exactly the voxels the reference
    marks; lesions grow by up to one voxel layer of the *source* grid, which for 3 mm slices (WMH)
    is about +-3 mm along z. A threshold t > 0 keeps `fraction >= t`; 0.5 preserves the volume.
    """
    data = warped.numpy()
    lesion = data > 0 if threshold <= 0 else data >= threshold
    return warped.new_image_like(lesion.astype(np.float32))


def crop_to_mask(
    volumes: dict[str, ants.ANTsImage], mask: ants.ANTsImage, mode: CropMode = "reference"
) -> tuple[dict[str, ants.ANTsImage], dict]:
    """Crop every volume to the bounding box of `mask != 0`, spec §2.1 step 4 (`cut.py`).

    mode "reference" reproduces `cut.py`'s `[min:max]` slicing, which drops the last non-zero index
    on every axis; "inclusive" keeps it. Unlike `cut.py`, which saved the crop with the uncropped
    affine, the origin moves with the crop so every voxel keeps its world position.
    """
    nonzero = np.nonzero(mask.numpy() != 0)
    if nonzero[0].size == 0:
        raise ValueError("cannot crop: the brain mask is empty")
    lower = np.array([int(ax.min()) for ax in nonzero])
    upper = np.array([int(ax.max()) for ax in nonzero]) + (1 if mode == "inclusive" else 0)
    if mode not in ("reference", "inclusive"):
        raise ValueError(f"crop mode must be 'reference' or 'inclusive', got {mode!r}")
    direction = np.asarray(mask.direction)
    origin = np.asarray(mask.origin) + direction @ (lower * np.asarray(mask.spacing))
    index = tuple(slice(lo, hi) for lo, hi in zip(lower, upper, strict=True))
    cropped = {}
    for name, volume in volumes.items():
        if tuple(volume.shape) != tuple(mask.shape):
            raise ValueError(f"{name} shape {volume.shape} differs from mask shape {mask.shape}")
        cropped[name] = ants.from_numpy(
            np.ascontiguousarray(volume.numpy()[index]),
            origin=tuple(float(o) for o in origin),
            spacing=tuple(volume.spacing),
            direction=direction,
        )
    info = {"mode": mode, "lower": lower.tolist(), "upper": upper.tolist()}
    return cropped, info


def n4_correct(image: ants.ANTsImage, mask: ants.ANTsImage, params: N4Params) -> ants.ANTsImage:
    """N4 bias-field correction weighted by the smoothed brain mask, spec §2.1 step 5.

    The reference ran BraTS without a weight mask because of a wrong folder name (a script defect,
    spec §2.1); here every dataset gets the mask.
    """
    weight = ants.smooth_image(mask.clone("float"), params.weight_mask_sigma)
    return ants.n4_bias_field_correction(
        image.clone("float"),
        shrink_factor=params.shrink_factor,
        convergence={"iters": list(params.iters), "tol": params.tol},
        weight_mask=weight,
    ).clone("float")


def binarise_labels(
    seg: ants.ANTsImage, background_labels: tuple[int, ...] = ()
) -> tuple[ants.ANTsImage, dict]:
    """Label map -> binary lesion mask: label > 0 is lesion unless in `background_labels`.

    BraTS {1, 2, 4} (or 2023's {1, 2, 3}) -> whole tumour; WMH label 2 ("other pathology") is
    lesion under the reference's > 0 rule unless the caller lists it as background. Returns the
    label voxel counts for the manifest.
    """
    labels = np.rint(seg.numpy()).astype(np.int64)
    values, counts = np.unique(labels, return_counts=True)
    lesion = labels > 0
    for label in background_labels:
        lesion &= labels != label
    info = {
        "label_voxels": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
        "background_labels": [int(v) for v in background_labels],
        "lesion_voxels": int(lesion.sum()),
    }
    return seg.new_image_like(lesion.astype(np.float32)), info
