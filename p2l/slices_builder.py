"""tensorflow-datasets builder: the normalised axial slices of one dataset's scans.

One build per (dataset, modality, data root, normalisation settings): every scan that a split
file names (`p2l.splits.dataset_rows`: IXI's every fold and its test list; a lesion set's test and
validation lists) goes through `p2l.normalization.load_subject` (spec §2.2) once, and its D axial
slices are stored in order. Folds, configs and sweep runs that read the same data share the build:
a fold is a selection of rows (p2l.builds). Scans are normalised by parallel worker processes.
Nothing is downloaded. A build is reused only while its input volumes are the ones it was made
from (`p2l.build_inputs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils
from tqdm import tqdm

from p2l import build_inputs, disk_check
from p2l.errors import ConfigError, DataError
from p2l.normalization import load_subject
from p2l.splits import SplitRow, check_files_exist

# tfds looks for prepared datasets and their DatasetInfo on gs://tfds-data when it constructs a
# builder; the data here is private and the machines may be offline, so never ask.
gcs_utils._is_gcs_disabled = True

logger = logging.getLogger(__name__)

# Bump when the stored content changes for the same inputs (normalisation, features), so that an
# old build is never reused: it is part of the config hash.
# 2: volumes reoriented to the first training volume's axes; 3: one build per dataset.
_CONTENT_VERSION = "3"
# Example keys are row_index * _KEY_STRIDE + slice_index; tfds keeps integer key order when
# shuffling is disabled.
_KEY_STRIDE = 100_000
SPLIT = "volumes"  # the build's one split: its rows' slices, row after row


@dataclass(frozen=True)
class _Inputs:
    data_root: str
    dataset: str
    modality: str
    rows: tuple[SplitRow, ...]
    target_shape: tuple[int, int, int]
    expected_spacing: float | None
    orientation: tuple[str, ...] | None


def _validate(
    data_root, dataset, modality, rows, target_shape, expected_spacing, orientation
) -> _Inputs:
    if modality not in ("t1", "t2"):
        raise ConfigError("modality", f"expected 't1' or 't2', got {modality!r}")
    # The lower-cased name is part of the tfds config name, which allows only these characters.
    if not isinstance(dataset, str) or not re.fullmatch(r"[A-Za-z0-9_]+", dataset):
        raise ConfigError("test_sets", f"invalid dataset name {dataset!r} (use [A-Za-z0-9_])")
    if not rows:
        raise DataError(dataset, "no scans to build")
    return _Inputs(
        data_root=str(Path(data_root).absolute()),
        dataset=dataset,
        modality=modality,
        rows=tuple(rows),
        target_shape=check_target_shape(target_shape),
        expected_spacing=None if expected_spacing is None else float(expected_spacing),
        orientation=None if orientation is None else tuple(orientation),
    )


def check_target_shape(target_shape) -> tuple[int, int, int]:
    shape = tuple(target_shape)
    if len(shape) != 3 or not all(isinstance(n, int | np.integer) and n > 0 for n in shape):
        raise ConfigError("target_shape", f"expected 3 positive integers, got {target_shape!r}")
    if shape[2] >= _KEY_STRIDE:
        raise ConfigError("target_shape", f"at most {_KEY_STRIDE - 1} slices are supported")
    return tuple(int(n) for n in shape)  # type: ignore[return-value]


def _config_hash(inputs: _Inputs) -> str:
    """Short hash of everything that decides the stored content (never reuse a stale build)."""
    params = {
        "content_version": _CONTENT_VERSION,
        "data_root": inputs.data_root,
        "dataset": inputs.dataset,
        "modality": inputs.modality,
        "rows": [[r.subject_id, r.image_path, r.mask_path, r.seg_path] for r in inputs.rows],
        "target_shape": list(inputs.target_shape),
        "expected_spacing": inputs.expected_spacing,
        "orientation": None if inputs.orientation is None else list(inputs.orientation),
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


class Patch2LocSlices(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Axial slices (H, W) of one dataset's normalised scans, one example per slice, in row then
    slice order, in one split ("volumes"); row r's slices are examples r*D .. r*D + D - 1.

    Not registered in tfds's global name registry (it needs constructor arguments, so
    `tfds.load(name)` could not build it anyway, and a second import would clash).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Slices normalised as in spec §2.2."}

    def __init__(
        self,
        *,
        data_root: str | os.PathLike,
        dataset: str,
        modality: str,
        rows: Sequence[SplitRow],
        target_shape: Sequence[int] = (192, 192, 100),
        expected_spacing: float | None = 1.0,
        orientation: Sequence[str] | None = None,
        data_dir: str | os.PathLike | None = None,
        workers: int = 1,
    ):
        inputs = _validate(
            data_root, dataset, modality, rows, target_shape, expected_spacing, orientation
        )
        self._inputs = inputs
        self._workers = max(1, int(workers))
        config = tfds.core.BuilderConfig(
            name=f"{dataset.lower()}_{inputs.modality}_{_config_hash(inputs)}",
            description=(
                f"{dataset} {inputs.modality}: {len(inputs.rows)} scans, target shape "
                f"{inputs.target_shape}, data root {inputs.data_root}"
            ),
        )
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")
        # tfds re-creates builders from this dict when unpickling (`__setstate__`).
        self._original_state = dict(
            data_root=data_root,
            dataset=dataset,
            modality=modality,
            rows=tuple(rows),
            target_shape=tuple(target_shape),
            expected_spacing=expected_spacing,
            orientation=orientation,
            data_dir=data_dir,
            workers=workers,
        )

    @property
    def rows(self) -> tuple[SplitRow, ...]:
        return self._inputs.rows

    def input_files(self) -> list[str]:
        """Every volume the build reads (image, mask, seg of each row), sorted, once each."""
        rows = self._inputs.rows
        paths = {p for row in rows for p in (row.image_path, row.mask_path, row.seg_path) if p}
        return sorted(paths)

    def estimated_bytes(self) -> int:
        """Upper estimate of the build's size: every row's volume as float32 (zlib does better)."""
        return len(self._inputs.rows) * math.prod(self._inputs.target_shape) * 4

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
            # Readers find a row's slices by position: keep generation order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        _check_inputs_exist(self)
        return {SPLIT: self._generate_examples()}

    def _load_kwargs(self) -> dict:
        inputs = self._inputs
        return dict(
            modality=inputs.modality,
            target_shape=inputs.target_shape,
            expected_spacing=inputs.expected_spacing,
            # Every volume is brought to the orientation of the IXI build's reference volume,
            # which p2l.orientation records as a run's training space: volumes stored another
            # way are scored in the layout the model learnt (a voxel permutation, no resampling).
            orientation=inputs.orientation,
            check_oblique=False,  # the dataset's own volumes, as the reference reads them
        )

    def _subjects(self) -> Iterator:
        """The rows' normalised subjects in row order, from up to `workers` processes."""
        rows, kwargs = self._inputs.rows, self._load_kwargs()
        args = [(r.image_path, r.mask_path, r.seg_path) for r in rows]
        ids = [r.subject_id for r in rows]
        if self._workers == 1 or len(rows) == 1:
            for a, sid in zip(args, ids, strict=True):
                yield load_subject(*a, subject_id=sid, **kwargs)
            return
        # Spawned, not forked: this process runs TensorFlow and JAX threads. At most 2 volumes per
        # worker are in flight, so memory stays bounded when writing is the slower side.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self._workers, mp_context=context) as pool:
            pending: deque = deque()
            for a, sid in zip(args, ids, strict=True):
                pending.append(pool.submit(load_subject, *a, subject_id=sid, **kwargs))
                if len(pending) >= 2 * self._workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _generate_examples(self):
        inputs = self._inputs
        desc = f"build {inputs.dataset} {inputs.modality}"
        subjects = tqdm(self._subjects(), total=len(inputs.rows), desc=desc, unit="scan")
        for index, subject in enumerate(subjects):
            num_slices = subject.image.shape[2]
            seg = subject.seg
            if seg is None:
                seg = np.zeros(subject.image.shape, np.uint8)
            logger.info(
                "%s: volume %d/%d %s (%d slices)",
                inputs.dataset,
                index + 1,
                len(inputs.rows),
                subject.subject_id,
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
                        "subject_id": subject.subject_id,
                        "slice_index": z,
                        "num_slices": num_slices,
                    },
                )


def build_slices(**kwargs) -> Patch2LocSlices:
    """Construct the builder (Patch2LocSlices' arguments) and prepare it offline.

    A second call reuses the existing build while its input volumes are unchanged (see
    `p2l.build_inputs`); a changed input deletes the build and makes it again, with a warning.
    Callers that may run concurrently hold the build's lock (p2l.builds).
    """
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
    check_files_exist(
        builder.input_files(),
        builder._inputs.data_root,
        f"of the {builder._inputs.dataset} build do not exist",
    )


@dataclass
class VolumeRecord:
    """One scan regrouped from its slices: arrays (H, W, D)."""

    image: np.ndarray
    mask: np.ndarray
    seg: np.ndarray | None
    subject_id: str
    num_slices: int


def read_volumes(builder: Patch2LocSlices, split: str = SPLIT) -> Iterator[VolumeRecord]:
    """Yield the volumes of `split` in build order by stacking consecutive slices."""
    source = builder.as_data_source(split=split)
    where = f"{builder.data_dir} (split {split!r})"
    position, total = 0, len(source)
    while position < total:
        volume = read_volume_at(source, position, where)
        position += volume.num_slices
        yield volume


def read_volume_at(source, position: int, where: str) -> VolumeRecord:
    """The volume whose slice 0 is example `position` of a tfds data source (one batched read)."""
    total = len(source)
    first = source[position]
    num_slices = int(first["num_slices"])
    subject_id = _text(first["subject_id"])
    if int(first["slice_index"]) != 0 or position + num_slices > total:
        raise DataError(where, f"corrupt build: volume {subject_id} does not start at slice 0")
    slices = [first, *source.__getitems__(list(range(position + 1, position + num_slices)))]
    for z, example in enumerate(slices):
        if int(example["slice_index"]) != z or _text(example["subject_id"]) != subject_id:
            raise DataError(where, f"corrupt build: slices of {subject_id} are out of order")
    has_seg = bool(first["has_seg"])
    return VolumeRecord(
        image=np.stack([s["image"] for s in slices], axis=-1),
        mask=np.stack([s["mask"] for s in slices], axis=-1),
        seg=np.stack([s["seg"] for s in slices], axis=-1) if has_seg else None,
        subject_id=subject_id,
        num_slices=num_slices,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
