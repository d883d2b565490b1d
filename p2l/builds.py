"""The prepared volumes a config reads, by part: what training and evaluation ask for.

Parts: "train", "val" (the IXI fold), "ixi_test", "<dataset>" (a lesion set's test CSV, lower
case) and "<dataset>_val" (its lesion validation CSV, when the splits folder has one). Each part
is a list of rows of one dataset's slice build (p2l.slices_builder), in CSV order, duplicates
kept: one IXI build serves every fold, one BraTS21 build every config and sweep run that reads
the same data with the same normalisation settings. Volumes are read lazily one at a time
(`volumes`), so evaluation holds one volume, not a test set, in memory.

Builds are made once: concurrent runs on one machine (a sweep's folds) take the build's lock and
wait for the first; the processes of a multi-process run wait at a barrier for process 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from p2l import orientation, splits
from p2l.errors import ConfigError, DataError
from p2l.slices_builder import (
    SPLIT,
    Patch2LocSlices,
    VolumeRecord,
    build_slices,
    check_target_shape,
    read_volume_at,
)

logger = logging.getLogger(__name__)

_IXI_PARTS = {"train": "train", "val": "val", "ixi_test": "test"}


def default_tfds_dir(config) -> str:
    if config.tfds_dir:
        return config.tfds_dir
    return str(Path(config.data_root).absolute().parent / "p2l_tfds")


def build_workers(config) -> int:
    """Processes that normalise scans during a build: data.build_workers, 0 = one per core."""
    workers = int(config.data.get("build_workers", 0))
    return workers if workers > 0 else min(8, os.cpu_count() or 1)


@contextlib.contextmanager
def _build_lock(data_dir: Path, name: str):
    """Exclusive flock on `<data_dir>/<name>.lock` while a build is checked and made."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"p2l: waiting for another process to finish the slice build {name} "
                  f"(lock {path})", flush=True)  # fmt: skip
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_test_sets(test_sets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(test_sets, str):
        raise ConfigError("test_sets", f"expected a sequence of dataset names, got {test_sets!r}")
    test_sets = tuple(test_sets)
    names = [n.lower() for n in test_sets]
    clash = set(names) & (set(_IXI_PARTS) | {"ixi"})
    if len(set(names)) != len(names) or clash or any(n.endswith("_val") for n in names):
        raise ConfigError(
            "test_sets",
            f"names must be distinct, not end in _val and not clash with {['IXI', *_IXI_PARTS]}",
        )
    return test_sets


class Builds:
    """The slice builds of a config (IXI and each test set) and its parts as rows of them."""

    def __init__(
        self,
        *,
        data_root,
        splits_dir,
        modality: str,
        fold: int,
        test_sets: Sequence[str],
        target_shape: Sequence[int],
        expected_spacing: float | None,
        data_dir,
        workers: int = 1,
    ):
        test_sets = _check_test_sets(test_sets)
        self.depth = check_target_shape(target_shape)[2]
        common = dict(
            data_root=data_root,
            modality=modality,
            target_shape=tuple(target_shape),
            expected_spacing=expected_spacing,
            data_dir=data_dir,
            workers=workers,
        )
        ixi_rows = splits.dataset_rows(splits_dir, splits.IXI, modality, data_root)
        # The IXI build's first row defines the orientation of every build (and the run's
        # training space, p2l.orientation.training_space).
        target = orientation.axcodes(orientation.file_affine(ixi_rows[0].image_path))
        self._kwargs = {
            splits.IXI: dict(common, dataset=splits.IXI, rows=ixi_rows, orientation=target)
        }
        # Part name -> (dataset, CSV rows).
        self._part_rows: dict[str, tuple[str, list[splits.SplitRow]]] = {
            part: (splits.IXI, splits.read_ixi_split(splits_dir, p, fold, modality, data_root,
                                                     False))
            for part, p in _IXI_PARTS.items()
        }  # fmt: skip
        for dataset in test_sets:
            rows = splits.dataset_rows(splits_dir, dataset, modality, data_root)
            self._kwargs[dataset] = dict(common, dataset=dataset, rows=rows, orientation=target)
            for part in ("test", "val"):
                if part == "test" or splits.dataset_csv_path(splits_dir, dataset, "val").is_file():
                    name = dataset.lower() + ("_val" if part == "val" else "")
                    csv_rows = splits.read_test_split(
                        splits_dir, dataset, modality, data_root, part, False
                    )
                    self._part_rows[name] = (dataset, csv_rows)
        splits.check_no_lesion_case_in_ixi(
            ixi_rows, {d: self._kwargs[d]["rows"] for d in test_sets}
        )
        self.builders: dict[str, Patch2LocSlices] = {}

    def prepare(self) -> Builds:
        """Make every build that does not exist yet (or is stale), one at a time, under its lock."""
        for dataset, kwargs in self._kwargs.items():
            builder = Patch2LocSlices(**kwargs)
            root = Path(builder.data_dir_root)
            with _build_lock(root, builder.builder_config.name):
                self.builders[dataset] = build_slices(**kwargs)
        return self

    def open(self) -> Builds:
        """Open builds made by another process (multi-process runs, after the barrier)."""
        self.builders = {d: Patch2LocSlices(**kw) for d, kw in self._kwargs.items()}
        return self

    def has(self, part: str) -> bool:
        return part in self._part_rows

    def _rows(self, part: str) -> tuple[str, list[splits.SplitRow]]:
        if part not in self._part_rows:
            raise ConfigError("data", f"no part {part!r} (known: {sorted(self._part_rows)})")
        return self._part_rows[part]

    def subject_ids(self, part: str) -> list[str]:
        return [row.subject_id for row in self._rows(part)[1]]

    def row_indices(self, part: str) -> list[int]:
        """The build rows of `part`, in CSV order (duplicated CSV rows repeat their index)."""
        dataset, rows = self._rows(part)
        position = {splits.row_key(r): i for i, r in enumerate(self._kwargs[dataset]["rows"])}
        return [position[splits.row_key(r)] for r in rows]

    def volumes(self, part: str, indices: Sequence[int] | None = None) -> Iterator[VolumeRecord]:
        """The volumes of `part` at `indices` (all, in order, when None), one at a time."""
        dataset, _ = self._rows(part)
        builder = self.builders.get(dataset)
        if builder is None:
            raise DataError(dataset, "the slice build is not prepared (Builds.prepare)")
        rows = self.row_indices(part)
        source = builder.as_data_source(split=SPLIT)
        where = f"{builder.data_path} ({part!r})"
        for i in range(len(rows)) if indices is None else indices:
            yield read_volume_at(source, rows[i] * self.depth, where)


def from_config(config) -> Builds:
    return Builds(
        data_root=config.data_root,
        splits_dir=config.splits_dir,
        modality=config.modality,
        fold=config.fold,
        test_sets=tuple(config.test_sets),
        target_shape=tuple(config.data.image_shape),
        expected_spacing=config.data.expected_spacing,
        data_dir=default_tfds_dir(config),
        workers=build_workers(config),
    )
