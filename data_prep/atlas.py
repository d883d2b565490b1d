"""The registration target: a brain-extracted T1 template and its brain mask (spec §2.1 step 3).

The paper registers to SRI24 `T1_brain.nii` (users download it and pass its path). Offline default:
the MNI152 2009a symmetric template that nilearn ships inside its wheel, read from the package
folder (never through a nilearn fetcher, which could download). Both are brain-extracted, so the
brain mask is the template's support (voxels > 0): it includes ventricles and sulcal CSF, as HD-BET
masks do. T1 and T2 scans both register to this T1 template, as in the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ants
import numpy as np

from data_prep.nifti import read_ants, sha256_file
from p2l.errors import DataError

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

    def describe(self) -> dict:
        """Provenance recorded in every manifest row."""
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "shape": [int(n) for n in self.image.shape],
            "spacing": [round(float(s), 6) for s in self.image.spacing],
            "orientation": ORIENTATION,
            "brain_mask": "template support (voxels > 0)",
            "brain_mask_voxels": int(self.brain_mask.numpy().sum()),
        }


def mni152_path() -> Path:
    """Path of the MNI152 2009a template inside the installed nilearn package (no download)."""
    import nilearn  # imported here: only this offline default needs it

    path = Path(nilearn.__file__).resolve().parent / "datasets" / "data" / MNI_FILE
    if not path.is_file():
        raise DataError(path, "nilearn's bundled MNI152 template is missing; reinstall nilearn")
    return path


def load_atlas(path: str | os.PathLike | None = None) -> Atlas:
    """Load a brain-extracted T1 template (default: nilearn's MNI152 2009a), reoriented to RAI.

    Raises DataError when the file is unreadable, not 3-D, not 1 mm isotropic (outputs must be
    1 mm, spec §2.1) or has no plausible brain (it must be brain-extracted, like SRI24 T1_brain).
    """
    if path is None:
        file, name = mni152_path(), "MNI152NLin2009aSym (nilearn bundled)"
    else:
        file, name = Path(path), f"user template {Path(path).name}"
    image = read_ants(file, kind="image").reorient_image2(ORIENTATION)
    spacing = np.asarray(image.spacing, dtype=float)
    if not np.allclose(spacing, 1.0, atol=1e-3):
        raise DataError(
            file, f"atlas must be 1 mm isotropic (outputs are 1 mm), got spacing {tuple(spacing)}"
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
    return Atlas(
        name=name, path=str(file.resolve()), sha256=sha256_file(file), image=image, brain_mask=mask
    )
