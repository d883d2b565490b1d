"""NIfTI volumes in, NIfTI volumes out, with errors that name the file.

Array layout: nibabel's voxel order (i, j, k), which equals the reference's layout (it reads with
SimpleITK and transposes (2, 1, 0), spec §2.2). A volume is (H, W, D) with D the axial slice axis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from p2l.atomic_write import atomic_path
from p2l.errors import DataError

VolumeKind = Literal["image", "mask", "seg"]

# Masks come out of a linear warp (spec §2.1 step 3), so values are fractional but stay in [0, 1];
# anything further outside is a label map or an unscaled image passed by mistake.
_MASK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Volume:
    """A 3-D float32 array with its voxel-to-world affine and the file it came from."""

    data: np.ndarray
    affine: np.ndarray
    path: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid shape (H, W, D)."""
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm: the column norms of the affine's 3x3 part."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(n) for n in norms)  # type: ignore[return-value]

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Where each voxel axis points in RAS+ world space, e.g. ('L', 'P', 'S') (ITK's RAI)."""
        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]


def read_volume(path: str | os.PathLike, *, kind: VolumeKind) -> Volume:
    """Read a NIfTI file fully into float32 and check it is usable as `kind`.

    Raises DataError for a missing, unreadable or truncated file, a shape that is not 3-D (a 4-D
    image with a trailing singleton axis is accepted), non-finite voxels, and for masks: no voxel
    > 0 or values outside [0, 1].
    """
    if kind not in ("image", "mask", "seg"):
        raise ValueError(f"kind must be 'image', 'mask' or 'seg', got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{kind} file not found")
    try:
        img = nib.load(path)
        # Reading the whole array here makes a truncated .nii.gz fail now, naming the file, rather
        # than later inside a filter. (nibabel otherwise reads lazily.)
        raw = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel raises EOFError, OSError, zlib.error, ImageFileError...
        raise DataError(
            path, f"cannot read as NIfTI (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err

    if raw.ndim > 3 and all(n == 1 for n in raw.shape[3:]):
        raw = raw.reshape(raw.shape[:3])
    if raw.ndim != 3:
        raise DataError(path, f"expected a 3-D volume, got shape {raw.shape}")
    if not np.all(np.isfinite(affine)) or np.any(np.linalg.norm(affine[:3, :3], axis=0) == 0):
        raise DataError(path, f"invalid voxel-to-world affine:\n{affine}")

    data = np.ascontiguousarray(raw, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise DataError(path, f"{bad} non-finite voxels (NaN or inf) of {data.size}")

    if kind == "mask":
        if not np.any(data > 0):
            raise DataError(path, "empty brain mask (no voxel > 0)")
        lo, hi = float(data.min()), float(data.max())
        if lo < -_MASK_TOLERANCE or hi > 1 + _MASK_TOLERANCE:
            raise DataError(
                path, f"brain mask values must lie in [0, 1], found range [{lo:g}, {hi:g}]"
            )
    return Volume(data=data, affine=affine, path=str(path))


def check_same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> None:
    """Raise DataError (naming both files) unless `a` and `b` share shape and affine."""
    if a.shape != b.shape:
        raise DataError(b.path, f"shape {b.shape} differs from {a.shape} of {a.path}")
    diff = float(np.max(np.abs(a.affine - b.affine)))
    if diff > atol:
        raise DataError(
            b.path,
            f"affine differs from that of {a.path} (largest difference {diff:.4g} > {atol:g})",
        )


def _nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return suffix
    raise DataError(path, "output file name must end with .nii or .nii.gz")


def write_volume_atomic(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    dtype: np.dtype | type = np.float32,
) -> None:
    """Write `data` as NIfTI via a temp file in the same folder and os.replace.

    Readers never see a half-written file, and an interrupted run leaves the old file intact.
    """
    path = Path(path)
    suffix = _nifti_suffix(path)
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D array for {path}, got shape {data.shape}")
    img = nib.Nifti1Image(data.astype(dtype), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
