"""Synthetic brain phantoms with known geometry for the data_prep tests (not a test module).

A phantom is an ellipsoidal "brain" of human size (about 500 mL, so the pipeline's plausibility
checks apply unchanged) with an inner "white matter" ellipsoid and two off-centre "ventricles" that
make it asymmetric, so registration has a unique answer. `scan` samples it in a chosen native grid
(spacing, orientation, a known rigid motion) exactly like a scanner would, from a function of world
coordinates, so every test knows where each structure must end up.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SEMI_AXES = np.array([48.0, 58.0, 43.0])  # mm, x (R-L), y (A-P), z (I-S)
LESION_CENTRE = np.array([20.0, 10.0, 10.0])  # mm, world (RAS)
LESION_RADIUS = 8.0


def tissue(points_ras: np.ndarray, contrast: str = "t1") -> np.ndarray:
    """Phantom intensity at world points (N, 3) in RAS mm; brain-extracted (0 outside)."""
    p = np.asarray(points_ras, dtype=float)
    r_brain = np.sum((p / SEMI_AXES) ** 2, axis=1)
    r_wm = np.sum((p / (SEMI_AXES * 0.7)) ** 2, axis=1)
    vent_a = np.sum(((p - [12.0, 15.0, 8.0]) / [6.0, 18.0, 8.0]) ** 2, axis=1)
    vent_b = np.sum(((p - [-10.0, -20.0, -5.0]) / [5.0, 10.0, 6.0]) ** 2, axis=1)
    gm, wm, csf = (100.0, 160.0, 30.0) if contrast == "t1" else (120.0, 80.0, 220.0)
    out = np.where(r_brain <= 1, gm, 0.0)
    out = np.where(r_wm <= 1, wm, out)
    out = np.where((vent_a <= 1) | (vent_b <= 1), csf, out)
    # A smooth, non-periodic-looking texture inside the brain: it makes the phantom asymmetric
    # enough that an affine registration has one clear optimum (an ellipsoid alone is nearly
    # rotation-invariant) and keeps intensities from being piecewise constant.
    texture = (
        25.0 * np.sin(p[:, 0] / 9.0 + 1.0) * np.cos(p[:, 1] / 11.0) * np.sin(p[:, 2] / 7.0 + 0.5)
    )
    return np.where(r_brain <= 1, out + texture + 10.0 * p[:, 2] / SEMI_AXES[2], 0.0)


def lesion(points_ras: np.ndarray) -> np.ndarray:
    """BraTS-like labels: core 4, rim 1, surrounding oedema 2 (0 elsewhere)."""
    d = np.linalg.norm(np.asarray(points_ras) - LESION_CENTRE, axis=1)
    return np.select([d <= 3, d <= 5, d <= LESION_RADIUS], [4, 1, 2], 0).astype(np.uint8)


def grid_affine(shape, spacing, axcodes: str = "LAS", rotation_deg: float = 0.0):
    """Voxel-to-RAS affine of a grid centred on the world origin, with axis codes and a tilt."""
    flips = {"R": 1, "L": -1, "A": 1, "P": -1, "S": 1, "I": -1}
    axes = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    direction = np.zeros((3, 3))
    for j, code in enumerate(axcodes):
        direction[axes[code], j] = flips[code]
    # nibabel's "to" convention: column j is where voxel axis j points (L = towards -x).
    angle = np.deg2rad(rotation_deg)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    linear = rot @ direction @ np.diag(spacing)
    centre = (np.asarray(shape) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ centre
    return affine


def world_points(shape, affine) -> np.ndarray:
    """RAS coordinates (N, 3) of every voxel centre, in C order of `shape`."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return index @ affine[:3, :3].T + affine[:3, 3]


def head_motion(rotation_deg: float, shift) -> np.ndarray:
    """4x4 rigid motion (rotation about z, then shift) taking atlas-space points to the scan's."""
    angle = np.deg2rad(rotation_deg)
    motion = np.eye(4)
    motion[:3, :3] = [
        [np.cos(angle), -np.sin(angle), 0],
        [np.sin(angle), np.cos(angle), 0],
        [0, 0, 1],
    ]
    motion[:3, 3] = shift
    return motion


def scan(
    shape,
    spacing,
    axcodes="LAS",
    grid_rotation_deg=0.0,
    head_rotation_deg=0.0,
    head_shift=(0, 0, 0),
    contrast="t1",
):
    """(image, labels, affine): the phantom sampled on a native grid.

    The grid has the given axis codes and is tilted by `grid_rotation_deg` (an oblique scan); the
    head itself is moved by `head_motion(head_rotation_deg, head_shift)` relative to the atlas.
    """
    affine = grid_affine(shape, spacing, axcodes, grid_rotation_deg)
    points = world_points(shape, affine)
    inverse = np.linalg.inv(head_motion(head_rotation_deg, head_shift))
    local = points @ inverse[:3, :3].T + inverse[:3, 3]
    image = tissue(local, contrast).reshape(shape).astype(np.float32)
    labels = lesion(local).reshape(shape)
    return image, labels, affine


def save(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    """Write a NIfTI file, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)
    return path


def atlas(path: Path) -> Path:
    """A 1 mm brain-extracted T1 phantom template in RAS (as nilearn's MNI file)."""
    shape = (110, 130, 100)
    image, _, affine = scan(shape, (1.0, 1.0, 1.0), "RAS")
    return save(path, image, affine)


# Registration and N4 shortened for tests (the checks allow it; defaults are the reference's).
FAST_ARGS = ["--registration-iterations", "100,50", "--n4-iterations", "20", "--no-progress"]
MOTION = {"head_rotation_deg": 10.0, "head_shift": (6.0, -5.0, 4.0)}


def write_raw_ixi(raw: Path, subjects: dict[str, tuple[str, ...]], t2_in_tar: bool = True) -> Path:
    """IXI raw layout: `<id>-T1.nii.gz` files, T2 scans inside `IXI-T2.tar` (or as files)."""
    import tarfile

    raw.mkdir(parents=True, exist_ok=True)
    members = []
    for number, (sid, modalities) in enumerate(sorted(subjects.items())):
        for modality in modalities:
            contrast = modality.lower()
            if contrast == "t1":
                data, _, affine = scan((100, 140, 52), (1.2, 1.0, 2.0), "LAS", 8.0, **MOTION)
            else:
                data, _, affine = scan(
                    (140, 52, 122), (1.0, 2.0, 1.0), "PSR", -5.0, contrast="t2", **MOTION
                )
            data = data * (1.0 + 0.05 * number)  # subjects differ a little
            name = f"{sid}-{modality.upper()}.nii.gz"
            if contrast == "t2" and t2_in_tar:
                members.append(save(raw / "staging" / name, data, affine))
            else:
                save(raw / name, data, affine, np.int16)
    if members:
        with tarfile.open(raw / "IXI-T2.tar", "w") as archive:
            for path in members:
                archive.add(path, arcname=path.name)
        for path in members:
            path.unlink()
        (raw / "staging").rmdir()
    return raw


def write_raw_brats(raw: Path, case: str = "BraTS2021_90001") -> Path:
    """BraTS 2021 case folder: 1 mm LPS skull-stripped t1/t2 and a {1, 2, 4} label map."""
    folder = raw / case
    t1, labels, affine = scan((124, 140, 104), (1.0, 1.0, 1.0), "LPS", 0.0, **MOTION)
    t2, _, _ = scan((124, 140, 104), (1.0, 1.0, 1.0), "LPS", 0.0, contrast="t2", **MOTION)
    save(folder / f"{case}_t1.nii.gz", t1, affine, np.int16)
    save(folder / f"{case}_t2.nii.gz", t2, affine, np.int16)
    save(folder / f"{case}_seg.nii.gz", labels, affine, np.uint8)
    return raw
