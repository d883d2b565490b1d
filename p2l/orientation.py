"""The voxel orientation a model was trained in, and bringing any scan to it without resampling.

The network never sees world coordinates: it sees the voxel array after the centred crop/pad of
spec §2.2, whose first two axes are the slice plane and whose third is the axial slice axis. The
reference's pipeline stores every volume in ITK's "RAI" (nibabel codes L, P, S; spec §2.1 step 1
and 3), so a model trained on it has learnt that array layout: the same scan stored LR-flipped or
with its axes permuted is, to the network, a different image. A run therefore records the
orientation (axis codes) and voxel spacing of its training data (`training_space.json`), and
inference brings each scan to that orientation by permuting/flipping voxel axes (`Reorientation`,
exact, no interpolation) and maps every output back onto the scan's own grid.

A scan that is clearly not registered to the training space is refused or warned about, with the
reason (`REGISTRATION_RULES`, checked by `check_registered`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornts

from p2l.atomic_write import write_json_atomic
from p2l.errors import DataError, P2LError
from p2l.preparation import record as preparation_record

FILENAME = "training_space.json"
_VERSION = 1

# Registered volumes (data_prep's ANTs output on the atlas grid, the atlases themselves, MNI/SRI24
# releases) are exactly axis-aligned: a voxel axis more than this far from a world axis means the
# scan is in native scanner space (IXI's native scans measure 6-7 degrees) and permuting axes
# cannot bring it to the training space; it needs registration (spec §2.1 step 3).
OBLIQUE_LIMIT_DEG = 5.0
# Affine registration to the atlas (spec §2.1 step 3) normalises head size (registered brains:
# 127-141 mm LR, 160-174 AP, 126-148 SI in ../shared/data and the demo data): a brain mask whose
# extent along a training axis differs from the training brain's by more than this factor covers
# a head that is not skull-stripped and registered, or the header's voxel sizes are wrong.
EXTENT_RATIO_LIMIT = 1.3
REGISTRATION_RULES = (
    f"refused: voxel axes more than {OBLIQUE_LIMIT_DEG:g} degrees from the world axes (oblique, "
    "native scanner space); refused: voxel spacing other than the training spacing after "
    f"reorientation; warned: brain extent along a training axis off by more than a factor "
    f"{EXTENT_RATIO_LIMIT:g} from the training brain's"
)


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """nibabel axis codes (RAS+ world): the direction each voxel axis points to, e.g. L, P, S."""
    return tuple(nib.aff2axcodes(np.asarray(affine)))  # type: ignore[return-value]


def obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and its nearest world axis."""
    return float(np.degrees(np.max(np.abs(nib.affines.obliquity(np.asarray(affine))))))


def all_orientations() -> list[np.ndarray]:
    """The 48 nibabel orientation arrays: every axis order (6) times every flip pattern (8)."""
    return [
        np.array([[axis, flip] for axis, flip in zip(order, flips, strict=True)], dtype=float)
        for order in itertools.permutations(range(3))
        for flips in itertools.product((1, -1), repeat=3)
    ]


@dataclass(frozen=True)
class Reorientation:
    """An exact axis permutation/flip from a scan's stored grid to a target orientation.

    `apply` and `invert` only move voxels (nibabel `apply_orientation`), so a scan stored in any
    of the 48 axis orders/flips gives the same target array, bit for bit, and `invert` puts any
    target-grid map back onto the stored grid. `target_affine` keeps every voxel's world position.
    """

    transform: np.ndarray  # nibabel orientation transform, stored axes -> target axes
    stored_shape: tuple[int, int, int]
    stored_affine: np.ndarray
    target_affine: np.ndarray

    @classmethod
    def between(
        cls,
        affine: np.ndarray,
        shape: Sequence[int],
        target: Sequence[str],
        *,
        source: str | os.PathLike = "<array>",
        check_oblique: bool = True,
    ) -> Reorientation:
        """The reorientation of a scan (`affine`, `shape`) to the axis codes `target`.

        Raises DataError naming `source` for a scan too oblique to be registered (see
        OBLIQUE_LIMIT_DEG; unless `check_oblique` is False): reorienting it to the nearest axes
        would leave it tilted.
        """
        affine = np.asarray(affine, dtype=np.float64)
        shape = tuple(int(n) for n in shape)
        angle = obliquity_deg(affine)
        if check_oblique and angle > OBLIQUE_LIMIT_DEG:
            raise DataError(
                source,
                f"voxel axes are {angle:.1f} degrees away from the world axes (limit "
                f"{OBLIQUE_LIMIT_DEG:g}): the scan is in native scanner space, not registered to "
                "the training space; register it with data_prep first (spec §2.1 step 3)",
            )
        target = tuple(str(c) for c in target)
        transform = ornts.ornt_transform(ornts.io_orientation(affine), ornts.axcodes2ornt(target))
        target_affine = affine @ ornts.inv_ornt_aff(transform, shape)
        return cls(transform, shape, affine, target_affine)  # type: ignore[arg-type]

    @property
    def stored_axcodes(self) -> tuple[str, str, str]:
        return axcodes(self.stored_affine)

    @property
    def target_axcodes(self) -> tuple[str, str, str]:
        return axcodes(self.target_affine)

    @property
    def is_identity(self) -> bool:
        return bool(np.all(self.transform == [[0, 1], [1, 1], [2, 1]]))

    @property
    def target_shape(self) -> tuple[int, int, int]:
        shape = [0, 0, 0]
        for n, (axis, _) in zip(self.stored_shape, self.transform, strict=True):
            shape[int(axis)] = n
        return tuple(shape)  # type: ignore[return-value]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Stored-grid array (extra trailing axes allowed) -> target grid."""
        array = np.asarray(array)
        if array.shape[:3] != self.stored_shape:
            raise ValueError(f"expected shape {self.stored_shape}, got {array.shape[:3]}")
        return np.ascontiguousarray(ornts.apply_orientation(array, self.transform))

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Target-grid array -> the stored grid (the exact inverse of `apply`)."""
        array = np.asarray(array)
        if array.shape[:3] != self.target_shape:
            raise ValueError(f"expected shape {self.target_shape}, got {array.shape[:3]}")
        inverse = np.zeros_like(self.transform)
        for axis, (to, flip) in enumerate(self.transform):
            inverse[int(to)] = (axis, flip)
        return np.ascontiguousarray(ornts.apply_orientation(array, inverse))


def brain_extent_mm(mask: np.ndarray, spacing: Sequence[float]) -> list[float]:
    """Bounding-box size (mm) of mask > 0 along each array axis."""
    index = np.argwhere(np.asarray(mask) > 0)
    if index.size == 0:
        return [0.0, 0.0, 0.0]
    size = index.max(axis=0) - index.min(axis=0) + 1
    return [round(float(n * s), 3) for n, s in zip(size, spacing, strict=True)]


def file_affine(path: str | os.PathLike) -> np.ndarray:
    """The affine in a NIfTI file's header (the voxels are not read)."""
    try:
        return nib.load(path).affine
    except Exception as err:  # missing or unreadable: the same wording as volume_io
        raise DataError(path, f"cannot read the NIfTI header: {err}") from None


def training_space(config) -> dict:
    """Orientation, spacing and brain extent of the run's training data.

    The model learns the array layout of the volumes it is trained on: the slice build brings
    every volume to the orientation of the IXI build's first row (p2l.builds), which therefore
    defines the space; the fold's training volumes' headers are read too and the record counts
    their orientations.
    """
    from p2l.splits import IXI, dataset_rows, read_ixi_split
    from p2l.volume_io import read_volume

    rows = read_ixi_split(
        config.splits_dir, "train", config.fold, config.modality, config.data_root, False
    )
    if not rows:
        raise DataError(config.splits_dir, f"no training rows for fold {config.fold}")
    first = dataset_rows(config.splits_dir, IXI, config.modality, config.data_root)[0]
    affine = file_affine(first.image_path)
    codes = axcodes(affine)
    spacing = [round(float(s), 6) for s in nib.affines.voxel_sizes(affine)]
    mask = read_volume(first.mask_path, kind="mask")
    counts: dict[str, int] = {}
    for row in rows:
        try:
            code = "".join(axcodes(nib.load(row.image_path).affine))
        except Exception:  # noqa: BLE001 - a missing file is the data loader's to report
            code = "unreadable"
        counts[code] = counts.get(code, 0) + 1
    return {
        "version": _VERSION,
        "axcodes": list(codes),
        "spacing": spacing,
        "brain_extent_mm": brain_extent_mm(mask.data, spacing),
        "source": first.image_path,
        "orientations_of_training_volumes": counts,
        # How data_prep made the training data (None for data it did not make): p2l.detect gives
        # a raw scan the same preparation (p2l.preparation.record).
        "preparation": preparation_record.from_manifest(first.image_path),
    }


def write_training_space(workdir: str | os.PathLike, config) -> dict:
    """Record the training space in `<workdir>/training_space.json` (once, at the first start).

    A resumed run keeps its record; if its training data are now stored in another orientation or
    spacing, the checkpoints were trained on arrays laid out differently: DataError.
    """
    space = training_space(config)
    path = Path(workdir) / FILENAME
    old = read_training_space(workdir)
    if old is not None:
        if old["axcodes"] != space["axcodes"] or not np.allclose(
            old["spacing"], space["spacing"], atol=1e-3
        ):
            raise DataError(
                path,
                f"this run was trained on {''.join(old['axcodes'])} volumes of spacing "
                f"{old['spacing']} mm, but the training data at {config.data_root} are now "
                f"{''.join(space['axcodes'])} at {space['spacing']} mm: use a new workdir",
            )
        return old
    if len(space["orientations_of_training_volumes"]) > 1:
        print(f"p2l: warning: the training volumes are stored in several orientations "
              f"({space['orientations_of_training_volumes']}); recording that of the first, "
              f"{''.join(space['axcodes'])} ({space['source']})", flush=True)  # fmt: skip
    write_json_atomic(path, space)
    return space


def read_training_space(workdir: str | os.PathLike) -> dict | None:
    """The record of `write_training_space`, or None for a run without one."""
    import json

    path = Path(workdir) / FILENAME
    if not path.exists():
        return None
    try:
        space = json.loads(path.read_text())
        codes = [str(c) for c in space["axcodes"]]
        axes = ornts.axcodes2ornt(codes)[:, 0]  # raises ValueError for an unknown code
        if sorted(axes) != [0, 1, 2] or len(space["spacing"]) != 3:
            raise ValueError(f"axis codes {codes} / spacing {space['spacing']}")
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(path, f"not a p2l training-space record ({err})") from None
    return space


def run_space(workdir: str | os.PathLike, config) -> dict | None:
    """The training space of a run: its record, else (older runs) the orientation of the data at
    config.data_root, else None, with a printed warning that the scan's orientation is assumed."""
    space = read_training_space(workdir)
    if space is not None:
        return space
    try:
        space = training_space(config)
    except (P2LError, OSError, TypeError, AttributeError) as err:
        print(f"p2l: warning: {Path(workdir) / FILENAME} not found (run trained before it was "
              f"recorded) and the training data cannot be read ({err}); assuming each scan is "
              "stored in the orientation the model was trained in", flush=True)  # fmt: skip
        return None
    print(f"p2l: {Path(workdir) / FILENAME} not found (run trained before it was recorded); "
          f"using the orientation of the training data at {config.data_root}: "
          f"{''.join(space['axcodes'])}", flush=True)  # fmt: skip
    return space


def check_registered(
    reorientation: Reorientation,
    mask: np.ndarray,
    space: dict | None,
    *,
    source: str | os.PathLike,
    log=print,
) -> None:
    """Warn (via `log`) when the brain's extent is far from the training brain's.

    `mask` is on the target grid. The oblique and spacing rules are checked where the scan is
    reoriented and normalised (`Reorientation.between`, `normalization.prepare_subject`).
    """
    if space is None or "brain_extent_mm" not in space:
        return
    spacing = nib.affines.voxel_sizes(reorientation.target_affine)
    extent = brain_extent_mm(mask, spacing)
    expected = space["brain_extent_mm"]
    ratios = [e / x if x > 0 and e > 0 else np.inf for e, x in zip(extent, expected, strict=True)]
    if any(not (1 / EXTENT_RATIO_LIMIT <= r <= EXTENT_RATIO_LIMIT) for r in ratios):
        codes = "".join(reorientation.target_axcodes)
        log(f"p2l: warning: {source}: brain extent along {codes} is {extent} mm, the training "
            f"brain's {expected} mm (factor > {EXTENT_RATIO_LIMIT:g}): the scan does not look "
            "skull-stripped and registered to the training space (spec §2.1 steps 2-3); results "
            "may be meaningless")  # fmt: skip
