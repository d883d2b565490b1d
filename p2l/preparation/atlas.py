"""The registration target: a brain-extracted T1 template and its brain mask (spec §2.1 step 3).

The paper registers to SRI24 `T1_brain.nii` (users download it and pass its path). Offline default:
the MNI152 2009a symmetric template that nilearn ships inside its wheel, read from the package
folder (never through a nilearn fetcher, which could download). Both are brain-extracted, so the
brain mask is the template's support (voxels > 0): it includes ventricles and sulcal CSF, as HD-BET
masks do. T1 and T2 scans both register to this T1 template, as in the reference.

Working grid: the input template must be 1 mm (spec §2.1 registers to a 1 mm atlas). For a coarser
working grid (`--spacing 2`, e.g. for the 2 mm IXI Hammersmith set) it is resampled once here:
image B-spline (as every image resample, spec §2.1 step 1), clipped to >= 0; brain mask = the 1 mm
support resampled linearly then >= 0.5; the image is zeroed outside that mask so "support" and
"brain mask" stay the same set of voxels, as at 1 mm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ants
import numpy as np

from p2l.errors import DataError
from p2l.preparation.ants_io import read_ants, sha256_file

# The reference reorients the template to RAI before registering (registration.py), so outputs are
# RAI (ITK convention: x runs right->left, y anterior->posterior, z inferior->superior).
ORIENTATION = "RAI"
MNI_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# A brain mask smaller than this (mL at 1 mm) means the file is not a brain-extracted T1 template.
_MIN_BRAIN_ML = 500.0


@dataclass(frozen=True)
class Atlas:
    """A T1 template in RAI with its binary brain mask and provenance for the manifest."""

    name: str
    path: str
    sha256: str
    image: ants.ANTsImage
    brain_mask: ants.ANTsImage
    # Working grid (mm). `sha256` is the 1 mm file's; at another spacing the restart key also holds
    # the spacing (PrepConfig.as_dict), and `describe` records how the working atlas was made.
    spacing_mm: float = 1.0

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel of the working grid in mL."""
        return float(np.prod(self.image.spacing)) / 1000.0

    def describe(self) -> dict:
        """Provenance recorded in every manifest row."""
        info = {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "shape": [int(n) for n in self.image.shape],
            "spacing": [round(float(s), 6) for s in self.image.spacing],
            "orientation": ORIENTATION,
            "brain_mask": "template support (voxels > 0)",
            "brain_mask_voxels": int(self.brain_mask.numpy().sum()),
        }
        if not is_unit_spacing(self.spacing_mm):
            info.update(
                working_spacing_mm=self.spacing_mm,
                resampled_from="1 mm file (sha256 above)",
                brain_mask="1 mm support resampled linearly, >= 0.5; image B-spline, 0 outside",
            )
        return info


def is_unit_spacing(spacing: float) -> bool:
    """True for the reference 1 mm grid (the behaviour every earlier output was made with)."""
    return abs(float(spacing) - 1.0) < 1e-6


def mni152_path() -> Path:
    """Path of the MNI152 2009a template inside the installed nilearn package (no download)."""
    import nilearn  # imported here: only this offline default needs it

    path = Path(nilearn.__file__).resolve().parent / "datasets" / "data" / MNI_FILE
    if not path.is_file():
        raise DataError(path, "nilearn's bundled MNI152 template is missing; reinstall nilearn")
    return path


def load_atlas(path: str | os.PathLike | None = None, spacing: float = 1.0) -> Atlas:
    """Load a brain-extracted T1 template (default: nilearn's MNI152 2009a), reoriented to RAI,
    on the working grid of `spacing` mm (resampled from the 1 mm file when not 1, see above).

    Raises DataError when the file is unreadable, not 3-D, not 1 mm isotropic (the input template
    must be 1 mm, spec §2.1, whatever the working grid) or has no plausible brain (it must be
    brain-extracted, like SRI24 T1_brain).
    """
    if not float(spacing) > 0:
        raise DataError(str(path or "atlas"), f"working spacing must be > 0 mm, got {spacing}")
    if path is None:
        file, name = mni152_path(), "MNI152NLin2009aSym (nilearn bundled)"
    else:
        file, name = Path(path), f"user template {Path(path).name}"
    image = read_ants(file, kind="image").reorient_image2(ORIENTATION)
    file_spacing = np.asarray(image.spacing, dtype=float)
    if not np.allclose(file_spacing, 1.0, atol=1e-3):
        raise DataError(
            file,
            "atlas must be 1 mm isotropic (a coarser working grid is made from the 1 mm file, "
            f"--spacing), got spacing {tuple(file_spacing)}",
        )
    support = (image.numpy() > 0).astype(np.float32)
    if support.sum() < _MIN_BRAIN_ML * 1000:
        raise DataError(
            file,
            f"only {int(support.sum())} voxels > 0: expected a brain-extracted T1 template "
            "(e.g. SRI24 T1_brain.nii) with zero background",
        )
    # A template with a noisy non-zero background would give a box-shaped mask: refuse it.
    if support.mean() > 0.6:
        raise DataError(
            file,
            f"{support.mean():.0%} of voxels are > 0: the atlas must be brain-extracted "
            "(zero outside the brain), e.g. SRI24 T1_brain.nii, not a whole-head template",
        )
    mask = image.new_image_like(support)
    if not is_unit_spacing(spacing):
        image, mask = _resample_atlas(image, mask, float(spacing))
        name = f"{name}, resampled to {float(spacing):g} mm"
    return Atlas(
        name=name,
        path=str(file.resolve()),
        sha256=sha256_file(file),
        image=image,
        brain_mask=mask,
        spacing_mm=float(spacing),
    )


def _resample_atlas(
    image: ants.ANTsImage, mask: ants.ANTsImage, spacing: float
) -> tuple[ants.ANTsImage, ants.ANTsImage]:
    """The 1 mm template and mask on a `spacing` mm grid (same origin and direction)."""
    target = (spacing, spacing, spacing)
    # B-spline as for every image (spec §2.1 step 1); it rings below 0 at the brain edge: clip.
    coarse = ants.resample_image(image, target, use_voxels=False, interp_type=4)
    support = ants.resample_image(mask, target, use_voxels=False, interp_type=0).numpy() >= 0.5
    data = np.where(support, np.clip(coarse.numpy(), 0.0, None), 0.0).astype(np.float32)
    # A voxel of the mask whose B-spline value is 0 would leave "support" != "mask": keep it tiny.
    data = np.where(support & (data <= 0), np.float32(1e-3), data)
    return coarse.new_image_like(data), coarse.new_image_like(support.astype(np.float32))
