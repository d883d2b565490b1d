"""Split CSVs of the reference repository's `splits/` folder (spec §1.1, §1.2).

Paths in the CSVs start with "/Train/..." or "/Test/..." and are relative to a data root laid out
as `<root>/Train/ixi/{t1,t2,mask}` and `<root>/Test/<Dataset>/{t1|t2,mask,seg}`. Rows are kept in
CSV order, duplicates included: the reference trains on the files as they are (spec §1.1).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from p2l.errors import ConfigError, DataError

IxiPart = Literal["train", "val", "test"]
Modality = Literal["t1", "t2"]

AVAIL_T2_CSV = "avail_t2.csv"
_REQUIRED_COLUMNS = ("img_name", "img_path", "mask_path")
_EXPECTED_FORMAT = (
    "expected a splits folder in the format of the reference repository's splits/ "
    "(IXI_train_fold{k}.csv, IXI_val_fold{k}.csv, IXI_test.csv, avail_t2.csv, "
    "<Dataset>_test.csv; columns img_name, img_path, mask_path[, seg_path] with paths such as "
    "/Train/ixi/t1/<id>_t1.nii.gz relative to the data root)"
)
_MAX_LISTED_MISSING = 5


@dataclass(frozen=True)
class SplitRow:
    """One scan named by a split CSV, with absolute paths under the data root."""

    subject_id: str
    image_path: str
    mask_path: str
    seg_path: str | None


def ixi_csv_path(splits_dir: str | os.PathLike, part: IxiPart, fold: int) -> Path:
    """The IXI split file for `part` ("train"/"val" per fold, "test" shared by all folds)."""
    if part == "test":
        return Path(splits_dir) / "IXI_test.csv"
    if part not in ("train", "val"):
        raise ConfigError("part", f"expected 'train', 'val' or 'test', got {part!r}")
    return Path(splits_dir) / f"IXI_{part}_fold{int(fold)}.csv"


def dataset_csv_path(splits_dir: str | os.PathLike, dataset: str, part: str = "test") -> Path:
    """The split file of a lesion dataset, `<dataset>_<part>.csv`."""
    if part not in ("test", "val"):
        raise ConfigError("part", f"expected 'test' or 'val', got {part!r}")
    return Path(splits_dir) / f"{dataset}_{part}.csv"


def _check_modality(modality: str) -> str:
    if modality not in ("t1", "t2"):
        raise ConfigError("modality", f"expected 't1' or 't2', got {modality!r}")
    return modality


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.parent.is_dir():
        raise DataError(path.parent, f"splits folder not found; {_EXPECTED_FORMAT}")
    if not path.is_file():
        raise DataError(path, f"split file not found; {_EXPECTED_FORMAT}")
    try:
        # dtype=str: names such as "0001" must not become numbers; empty cells become NaN.
        frame = pd.read_csv(path, dtype=str)
    except Exception as err:
        raise DataError(path, f"cannot parse as CSV ({err}); {_EXPECTED_FORMAT}") from err
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; {_EXPECTED_FORMAT}")
    return frame


def _subject_id(img_name: str) -> str:
    for suffix in ("_t1.nii.gz", "_t2.nii.gz", ".nii.gz", ".nii"):
        if img_name.endswith(suffix):
            return img_name[: -len(suffix)]
    return img_name


def _under_root(data_root: Path, relative: str) -> Path:
    # CSV paths start with "/" but are relative to the data root (spec §1.1).
    return data_root / relative.lstrip("/")


def _modality_mask(mask_path: Path, modality: str) -> Path:
    # data_prep writes one mask (and seg) folder per modality (`mask_t2/`, `seg_t2/`), because T1
    # and T2 are registered independently and the reference pipelines wrote both modalities' masks
    # to the same `mask/` folder (spec §2.1); prefer the modality's own file when present.
    candidate = mask_path.parent.with_name(f"{mask_path.parent.name}_{modality}") / mask_path.name
    return candidate if candidate.is_file() else mask_path


def _rows(
    frame: pd.DataFrame,
    csv_path: Path,
    data_root: str | os.PathLike,
    modality: str,
    check_files: bool,
) -> list[SplitRow]:
    if frame.empty:
        raise DataError(csv_path, f"no rows to use for modality {modality}")
    root = Path(data_root).absolute()
    has_seg = "seg_path" in frame.columns
    rows: list[SplitRow] = []
    for number, record in enumerate(frame.itertuples(index=False), start=1):
        for column in _REQUIRED_COLUMNS:
            value = getattr(record, column)
            if not isinstance(value, str) or not value.strip():
                raise DataError(csv_path, f"data row {number} has an empty {column}")
        img_name, img_path, mask_path = record.img_name, record.img_path, record.mask_path
        seg_value = record.seg_path if has_seg else None
        seg = _under_root(root, seg_value) if isinstance(seg_value, str) and seg_value else None
        seg = None if seg is None else _modality_mask(seg, modality)
        rows.append(
            SplitRow(
                subject_id=_subject_id(img_name),
                image_path=str(_under_root(root, img_path)),
                mask_path=str(_modality_mask(_under_root(root, mask_path), modality)),
                seg_path=None if seg is None else str(seg),
            )
        )
    if check_files:
        _check_files_exist(rows, csv_path, root)
    return rows


def _check_files_exist(rows: list[SplitRow], csv_path: Path, root: Path) -> None:
    paths = [p for row in rows for p in (row.image_path, row.mask_path, row.seg_path) if p]
    check_files_exist(
        paths, csv_path, f"named in this split do not exist under the data root {root}"
    )


def check_files_exist(paths, where, what: str) -> None:
    """DataError at `where` listing the first missing of `paths` (each checked once): "<n>
    file(s) <what>; first <k>: ..." (the split readers and the slice build)."""
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing:
        listed = "\n  ".join(missing[:_MAX_LISTED_MISSING])
        raise DataError(
            where,
            f"{len(missing)} file(s) {what}; first {min(len(missing), _MAX_LISTED_MISSING)}:"
            f"\n  {listed}",
        )


def read_ixi_split(
    splits_dir: str | os.PathLike,
    part: IxiPart,
    fold: int,
    modality: Modality,
    data_root: str | os.PathLike,
    check_files: bool = True,
) -> list[SplitRow]:
    """Rows of an IXI split file, with the reference's T2 rule (spec §1.1).

    T2: keep rows whose `img_name` (a T1 file name) is in `avail_t2.csv` column "0" with t2->t1,
    then rewrite every "t1" in `img_path` to "t2" (`Datamodules_train.IXI`).
    """
    _check_modality(modality)
    csv_path = ixi_csv_path(splits_dir, part, fold)
    frame = _read_csv(csv_path, _REQUIRED_COLUMNS)
    if modality == "t2":
        avail_path = Path(splits_dir) / AVAIL_T2_CSV
        avail = _read_csv(avail_path, ("0",))
        t1_names = set(avail["0"].dropna().str.replace("t2", "t1"))
        frame = frame[frame["img_name"].isin(t1_names)].copy()
        frame["img_path"] = frame["img_path"].str.replace("t1", "t2")
    return _rows(frame, csv_path, data_root, modality, check_files)


def _rewrite_test_path_t2(dataset: str, img_path: str) -> str:
    # The reference's per-dataset rules (spec §1.2); other names get the generic one.
    if dataset == "Brats21":
        return img_path.replace("t1", "t2")
    if dataset == "MSLUB":
        return img_path.replace("MSLUB/t1", "MSLUB/t2").replace("t1.nii.gz", "t2.nii.gz")
    return img_path.replace("/t1/", "/t2/").replace("_t1.nii.gz", "_t2.nii.gz")


def read_test_split(
    splits_dir: str | os.PathLike,
    dataset: str,
    modality: Modality,
    data_root: str | os.PathLike,
    part: Literal["test", "val"] = "test",
    check_files: bool = True,
) -> list[SplitRow]:
    """Rows of `<dataset>_<part>.csv` (e.g. Brats21, MSLUB, ATLAS_v2, WMH), spec §1.2."""
    _check_modality(modality)
    csv_path = dataset_csv_path(splits_dir, dataset, part)
    frame = _read_csv(csv_path, _REQUIRED_COLUMNS)
    if modality == "t2":
        frame = frame.copy()
        frame["img_path"] = [
            _rewrite_test_path_t2(dataset, p) if isinstance(p, str) else p
            for p in frame["img_path"]
        ]
    return _rows(frame, csv_path, data_root, modality, check_files)


IXI = "IXI"


def ixi_folds(splits_dir: str | os.PathLike) -> list[int]:
    """The folds k with an `IXI_train_fold{k}.csv` in the splits folder, sorted."""
    found = (re.fullmatch(r"IXI_train_fold(\d+)\.csv", p.name) for p in Path(splits_dir).iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def dataset_rows(
    splits_dir: str | os.PathLike,
    dataset: str,
    modality: Modality,
    data_root: str | os.PathLike,
    check_files: bool = False,
) -> list[SplitRow]:
    """Every scan of `dataset` that a split file of the folder names, once each, sorted by path.

    These are the rows of the dataset's one slice build (p2l.builds), shared by every fold,
    config and part: "IXI" gathers IXI_test.csv and the train and val files of every fold, so a
    fold is a selection of rows of the one IXI build; a lesion set gathers <dataset>_test.csv and
    its <dataset>_val.csv when there is one.
    """
    if dataset == IXI:
        parts = [read_ixi_split(splits_dir, "test", 0, modality, data_root, check_files)]
        folds = ixi_folds(splits_dir)
        if not folds:
            raise DataError(splits_dir, f"no IXI_train_fold<k>.csv; {_EXPECTED_FORMAT}")
        for fold in folds:
            for part in ("train", "val"):
                # A missing val file is reported by the reader of the fold's val part.
                if ixi_csv_path(splits_dir, part, fold).is_file():
                    parts.append(
                        read_ixi_split(splits_dir, part, fold, modality, data_root, check_files)
                    )
    else:
        parts = [read_test_split(splits_dir, dataset, modality, data_root, "test", check_files)]
        if dataset_csv_path(splits_dir, dataset, "val").is_file():
            parts.append(
                read_test_split(splits_dir, dataset, modality, data_root, "val", check_files)
            )
    unique = {row_key(r): r for rows in parts for r in rows}
    return [unique[key] for key in sorted(unique)]


def row_key(row: SplitRow) -> tuple[str, str, str]:
    """What identifies a row's volume in its dataset's build (its files)."""
    return (row.image_path, row.mask_path, row.seg_path or "")


def check_no_lesion_case_in_ixi(ixi_rows: Sequence[SplitRow],
                                lesion_rows: dict[str, Sequence[SplitRow]]) -> None:  # fmt: skip
    """Raises ConfigError when a lesion set's scan (test or validation CSV) is also an IXI row.

    IXI rows are trained on (train), validated and thresholded on (val, test): a lesion case
    among them would leak its slices into training or threshold selection. Compared by subject
    id and by the image file's real path (a link or a second name of one file counts)."""
    ids = {r.subject_id: r for r in ixi_rows}
    files = {os.path.realpath(r.image_path): r for r in ixi_rows}
    for dataset, rows in lesion_rows.items():
        for row in rows:
            same = ids.get(row.subject_id) or files.get(os.path.realpath(row.image_path))
            if same is not None:
                raise ConfigError(
                    "splits_dir",
                    f"{dataset} case {row.subject_id} ({row.image_path}) is also a healthy IXI "
                    f"row ({same.image_path}): its slices would be used for training or "
                    "threshold selection; remove it from the IXI split CSVs",
                )
