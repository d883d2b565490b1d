"""NIfTI files in and out of ANTsPy: validated reads, atomic writes, content hashes.

Reads go through ITK (`ants.image_read`) as in the reference scripts, so orientation and qform/sform
handling match them; the file is first checked with `p2l.volume_io.read_volume`, which reads every
voxel, so a truncated or corrupt file fails here with its path instead of deep inside ITK.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Literal

import ants
import numpy as np

from p2l.atomic_write import atomic_path
from p2l.errors import DataError
from p2l.volume_io import read_volume

Kind = Literal["image", "mask", "seg"]
# Output voxel types: images float32, masks float32 (fractional border from the linear warp, spec
# §2.1 step 3), segmentations binary uint8 (spec §2.2 binarisation).
PIXEL_TYPES = {"image": "float", "mask": "float", "seg": "unsigned char"}


def read_ants(path: str | os.PathLike, kind: Kind) -> ants.ANTsImage:
    """Read a 3-D NIfTI as a float ANTs image; DataError names the file for any defect.

    `kind` "seg" additionally requires non-negative integer labels. A 4-D file with a trailing
    singleton axis is accepted (some exporters write one).
    """
    path = Path(path)
    # "seg" is checked as an image here (its own label checks follow): read_volume's mask checks
    # would reject label values above 1.
    volume = read_volume(path, kind="image" if kind == "seg" else kind)
    try:
        image = ants.image_read(str(path))
    except Exception as err:  # ITK raises RuntimeError with a multi-line C++ trace
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(path, f"ITK cannot read this NIfTI file: {first}") from err
    if image.dimension == 4:
        # read_volume accepted only a trailing singleton 4th axis; drop it, keep the 3-D geometry.
        image = ants.from_numpy(
            volume.data,
            origin=tuple(image.origin[:3]),
            spacing=tuple(image.spacing[:3]),
            direction=np.asarray(image.direction)[:3, :3],
        )
    if image.dimension != 3 or image.components != 1:
        raise DataError(path, f"expected a 3-D scalar volume, ITK reads {image.dimension}-D")
    image = image.clone("float")
    if kind == "seg":
        labels = volume.data
        if labels.min() < 0 or not np.array_equal(labels, np.round(labels)):
            raise DataError(
                path,
                "segmentation must hold non-negative integer labels, found values in "
                f"[{labels.min():g}, {labels.max():g}] that are not all integers",
            )
    return image


def write_ants_atomic(image: ants.ANTsImage, path: str | os.PathLike, kind: Kind) -> None:
    """Write `image` as `kind`'s voxel type atomically (p2l.atomic_write)."""
    path = Path(path)
    if not path.name.endswith((".nii.gz", ".nii")):
        raise DataError(path, "output file name must end with .nii.gz or .nii")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        ants.image_write(image.clone(PIXEL_TYPES[kind]), str(tmp))


def link_atomic(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make `target` a hard link of `source` (a copy where links are impossible), atomically."""
    source, target = Path(source), Path(target)
    if target.exists() and os.path.samefile(source, target):
        return  # rename() onto a link of the same file would do nothing and leave the temp name
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or links not supported
            shutil.copyfile(source, tmp)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
