"""tensorflow-datasets builder: normalised axial slices of the IXI folds and the lesion test sets.

Every scan goes through `p2l.normalization.load_subject` (spec §2.2) once, and its D axial slices
are stored in order, so training can sample slices and evaluation can regroup whole volumes
(`read_volumes`). Build with `build_slices(...)`; nothing is downloaded. A build is reused only
while its input volumes are the ones it was made from (`p2l.build_inputs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from p2l import build_inputs, disk_check, orientation
from p2l.errors import ConfigError, DataError
from p2l.normalization import load_subject
from p2l.splits import (
    AVAIL_T2_CSV,
    SplitRow,
    dataset_csv_path,
    ixi_csv_path,
    read_ixi_split,
    read_test_split,
)

# tfds looks for prepared datasets and their DatasetInfo on gs://tfds-data when it constructs a
# builder; the data here is private and the machines may be offline, so never ask.
gcs_utils._is_gcs_disabled = True

logger = logging.getLogger(__name__)

# Bump when the stored content changes for the same inputs (normalisation, features), so that an
# old build is never reused: it is part of the config hash.
_CONTENT_VERSION = "2"  # 2: volumes reoriented to the first training volume's axes
# Example keys are subject_index * _KEY_STRIDE + slice_index; tfds keeps integer key order when
# shuffling is disabled.
_KEY_STRIDE = 100_000
_IXI_SPLITS = {"train": "train", "val": "val", "ixi_test": "test"}


@dataclass(frozen=True)
class _Inputs:
    data_root: str
    splits_dir: str
    modality: str
    fold: int
    test_sets: tuple[str, ...]
    target_shape: tuple[int, int, int]
    expected_spacing: float | None


def _validate(
    data_root: str | os.PathLike,
    splits_dir: str | os.PathLike,
    modality: str,
    fold: int,
    test_sets: Sequence[str],
    target_shape: Sequence[int],
    expected_spacing: float | None,
) -> _Inputs:
    if modality not in ("t1", "t2"):
        raise ConfigError("modality", f"expected 't1' or 't2', got {modality!r}")
    if isinstance(test_sets, str):
        raise ConfigError("test_sets", f"expected a sequence of dataset names, got {test_sets!r}")
    test_sets = tuple(test_sets)
    for name in test_sets:
        # The lower-cased name becomes a tfds split name, which allows only these characters.
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ConfigError("test_sets", f"invalid dataset name {name!r} (use [A-Za-z0-9_])")
    split_names = [name.lower() for name in test_sets]
    if len(set(split_names)) != len(split_names) or set(split_names) & set(_IXI_SPLITS):
        raise ConfigError(
            "test_sets", f"names must be distinct and not clash with {list(_IXI_SPLITS)}"
        )
    shape = tuple(target_shape)
    if len(shape) != 3 or not all(isinstance(n, int | np.integer) and n > 0 for n in shape):
        raise ConfigError("target_shape", f"expected 3 positive integers, got {target_shape!r}")
    if shape[2] >= _KEY_STRIDE:
        raise ConfigError("target_shape", f"at most {_KEY_STRIDE - 1} slices are supported")
    return _Inputs(
        data_root=str(Path(data_root).absolute()),
        splits_dir=str(Path(splits_dir).absolute()),
        modality=modality,
        fold=int(fold),
        test_sets=test_sets,
        target_shape=tuple(int(n) for n in shape),  # type: ignore[arg-type]
        expected_spacing=None if expected_spacing is None else float(expected_spacing),
    )


def _read_rows(inputs: _Inputs, check_files: bool) -> dict[str, list[SplitRow]]:
    """Split name -> rows, in CSV order."""
    rows = {
        split: read_ixi_split(
            inputs.splits_dir, part, inputs.fold, inputs.modality, inputs.data_root, check_files
        )
        for split, part in _IXI_SPLITS.items()
    }
    for dataset in inputs.test_sets:
        rows[dataset.lower()] = read_test_split(
            inputs.splits_dir, dataset, inputs.modality, inputs.data_root, check_files=check_files
        )
    return rows


def _config_hash(inputs: _Inputs) -> str:
    """Short hash of everything that decides the stored content (never reuse a stale build)."""
    digest = hashlib.sha256()
    params = {
        "content_version": _CONTENT_VERSION,
        "data_root": inputs.data_root,
        "modality": inputs.modality,
        "fold": inputs.fold,
        "test_sets": list(inputs.test_sets),
        "target_shape": list(inputs.target_shape),
        "expected_spacing": inputs.expected_spacing,
    }
    digest.update(json.dumps(params, sort_keys=True).encode())
    csv_paths = [
        ixi_csv_path(inputs.splits_dir, part, inputs.fold) for part in _IXI_SPLITS.values()
    ]
    if inputs.modality == "t2":
        csv_paths.append(Path(inputs.splits_dir) / AVAIL_T2_CSV)
    csv_paths += [dataset_csv_path(inputs.splits_dir, name) for name in inputs.test_sets]
    for path in csv_paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


class Patch2LocSlices(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Axial slices (H, W) of normalised scans, one example per slice, in CSV then slice order.

    Splits: "train", "val" (IXI fold k), "ixi_test", and one per test set, lower-cased
    ("brats21", "mslub", "atlas_v2", "wmh", "synth").

    Not registered in tfds's global name registry (it needs constructor arguments, so
    `tfds.load(name)` could not build it anyway, and a second import would clash).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Slices normalised as in spec §2.2."}

    def __init__(
        self,
        *,
        data_root: str | os.PathLike,
        splits_dir: str | os.PathLike,
        modality: str = "t2",
        fold: int = 0,
        test_sets: Sequence[str] = ("Brats21", "MSLUB"),
        target_shape: Sequence[int] = (192, 192, 100),
        expected_spacing: float | None = 1.0,
        data_dir: str | os.PathLike | None = None,
    ):
        inputs = _validate(
            data_root, splits_dir, modality, fold, test_sets, target_shape, expected_spacing
        )
        # Reading the CSVs now reports a missing or malformed split file before any work; the
        # scans themselves are only required when the build runs (_split_generators), so an
        # existing build stays readable without the raw data.
        self._rows = _read_rows(inputs, check_files=False)
        self._inputs = inputs
        config = tfds.core.BuilderConfig(
            name=f"{inputs.modality}_fold{inputs.fold}_{_config_hash(inputs)}",
            description=(
                f"{inputs.modality} fold {inputs.fold}, test sets {list(inputs.test_sets)}, "
                f"target shape {inputs.target_shape}, data root {inputs.data_root}"
            ),
        )
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")
        # tfds re-creates builders from this dict when unpickling (`__setstate__`).
        self._original_state = dict(
            data_root=data_root,
            splits_dir=splits_dir,
            modality=modality,
            fold=fold,
            test_sets=tuple(test_sets),
            target_shape=tuple(target_shape),
            expected_spacing=expected_spacing,
            data_dir=data_dir,
        )

    def input_files(self) -> list[str]:
        """Every volume the build reads (image, mask, seg of each row), sorted, once each."""
        rows = [row for split_rows in self._rows.values() for row in split_rows]
        paths = {p for row in rows for p in (row.image_path, row.mask_path, row.seg_path) if p}
        return sorted(paths)

    def estimated_bytes(self) -> int:
        """Upper estimate of the build's size: every row's volume as float32 (zlib does better)."""
        rows = sum(len(split_rows) for split_rows in self._rows.values())
        return rows * math.prod(self._inputs.target_shape) * 4

    def _info(self) -> tfds.core.DatasetInfo:
        height, width, _ = self._inputs.target_shape
        zlib = tfds.features.Encoding.ZLIB
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(height, width), dtype=np.float32, encoding=zlib
                    ),
                    "mask": tfds.features.Tensor(
                        shape=(height, width), dtype=np.float32, encoding=zlib
                    ),
                    "seg": tfds.features.Tensor(
                        shape=(height, width), dtype=np.uint8, encoding=zlib
                    ),
                    "has_seg": tfds.features.Tensor(shape=(), dtype=np.bool_),
                    "subject_id": tfds.features.Text(),
                    "slice_index": tfds.features.Tensor(shape=(), dtype=np.int32),
                    "num_slices": tfds.features.Tensor(shape=(), dtype=np.int32),
                }
            ),
            # Evaluation regroups consecutive slices into volumes: keep generation order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        if not Path(self._inputs.data_root).is_dir():
            raise DataError(self._inputs.data_root, "data root folder not found")
        rows = _read_rows(self._inputs, check_files=True)
        # Every volume is brought to the orientation of the fold's first training volume, the one
        # p2l.orientation records as the run's training space: test volumes stored another way
        # are then scored in the layout the model learnt (a voxel permutation, no resampling).
        target = orientation.axcodes(orientation.file_affine(rows["train"][0].image_path))
        return {
            split: self._generate_examples(split, split_rows, target)
            for split, split_rows in rows.items()
        }

    def _generate_examples(self, split: str, rows: list[SplitRow], target_axcodes):
        inputs = self._inputs
        for index, row in enumerate(rows):
            subject = load_subject(
                row.image_path,
                row.mask_path,
                row.seg_path,
                modality=inputs.modality,
                subject_id=row.subject_id,
                target_shape=inputs.target_shape,
                expected_spacing=inputs.expected_spacing,
                orientation=target_axcodes,
                check_oblique=False,  # the dataset's own volumes, as the reference reads them
            )
            num_slices = subject.image.shape[2]
            seg = subject.seg
            if seg is None:
                seg = np.zeros(subject.image.shape, np.uint8)
            logger.info(
                "%s: volume %d/%d %s (%d slices)",
                split,
                index + 1,
                len(rows),
                row.subject_id,
                num_slices,
            )
            for z in range(num_slices):
                yield (
                    index * _KEY_STRIDE + z,
                    {
                        "image": np.ascontiguousarray(subject.image[:, :, z]),
                        "mask": np.ascontiguousarray(subject.mask[:, :, z]),
                        "seg": np.ascontiguousarray(seg[:, :, z]),
                        "has_seg": subject.seg is not None,
                        "subject_id": row.subject_id,
                        "slice_index": z,
                        "num_slices": num_slices,
                    },
                )


def build_slices(
    *,
    data_root: str | os.PathLike,
    splits_dir: str | os.PathLike,
    modality: str = "t2",
    fold: int = 0,
    test_sets: Sequence[str] = ("Brats21", "MSLUB"),
    target_shape: Sequence[int] = (192, 192, 100),
    expected_spacing: float | None = 1.0,
    data_dir: str | os.PathLike | None = None,
) -> Patch2LocSlices:
    """Construct the builder and prepare it offline.

    A second call reuses the existing build while its input volumes are unchanged (see
    `p2l.build_inputs`); a changed input deletes the build and makes it again, with a warning.
    """
    kwargs = dict(
        data_root=data_root,
        splits_dir=splits_dir,
        modality=modality,
        fold=fold,
        test_sets=test_sets,
        target_shape=target_shape,
        expected_spacing=expected_spacing,
        data_dir=data_dir,
    )
    builder = Patch2LocSlices(**kwargs)
    build_dir = Path(builder.data_path)
    if build_dir.exists():
        found = build_inputs.check(build_dir, builder.input_files())
        if found.stale is None:
            if found.missing:
                logger.warning(build_inputs.missing_warning(build_dir, found.missing))
            return builder
        logger.warning("p2l: rebuilding the slices in %s: %s", build_dir, found.stale)
        # Every input must exist before the stale build goes (the error then names them all).
        _check_inputs_exist(builder)
        try:
            shutil.rmtree(build_dir)
        except OSError as err:
            raise DataError(build_dir, f"cannot remove the stale build: {err.strerror}") from None
        builder = Patch2LocSlices(**kwargs)  # not the deleted build's DatasetInfo
    _check_inputs_exist(builder)
    disk_check.check_writable(builder.data_dir_root, builder.estimated_bytes(), "the slice build")
    # Taken before the build reads the files: one modified meanwhile is seen as changed next time.
    record = build_inputs.fingerprint(builder.input_files())
    # tfds builds in a temporary folder and renames it when complete; the record is written
    # after that, so an interrupted build has no record and is never used.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        )
    )
    build_inputs.write(build_dir, record)
    return builder


def _check_inputs_exist(builder: Patch2LocSlices) -> None:
    if not Path(builder._inputs.data_root).is_dir():
        raise DataError(builder._inputs.data_root, "data root folder not found")
    _read_rows(builder._inputs, check_files=True)


@dataclass
class VolumeRecord:
    """One scan regrouped from its slices: arrays (H, W, D)."""

    image: np.ndarray
    mask: np.ndarray
    seg: np.ndarray | None
    subject_id: str
    num_slices: int


def read_volumes(builder: Patch2LocSlices, split: str) -> Iterator[VolumeRecord]:
    """Yield the volumes of `split` in build order by stacking consecutive slices."""
    source = builder.as_data_source(split=split)
    where = f"{builder.data_dir} (split {split!r})"
    position, total = 0, len(source)
    while position < total:
        first = source[position]
        num_slices = int(first["num_slices"])
        subject_id = _text(first["subject_id"])
        if int(first["slice_index"]) != 0 or position + num_slices > total:
            raise DataError(where, f"corrupt build: volume {subject_id} does not start at slice 0")
        # One batched read per volume (array_record random access).
        slices = [first, *source.__getitems__(list(range(position + 1, position + num_slices)))]
        for z, example in enumerate(slices):
            if int(example["slice_index"]) != z or _text(example["subject_id"]) != subject_id:
                raise DataError(where, f"corrupt build: slices of {subject_id} are out of order")
        position += num_slices
        has_seg = bool(first["has_seg"])
        yield VolumeRecord(
            image=np.stack([s["image"] for s in slices], axis=-1),
            mask=np.stack([s["mask"] for s in slices], axis=-1),
            seg=np.stack([s["seg"] for s in slices], axis=-1) if has_seg else None,
            subject_id=subject_id,
            num_slices=num_slices,
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
