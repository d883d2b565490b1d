"""Check a prepared data root against its manifests and the split CSVs.

    python -m data_prep.validate OUT [--splits DIR] [--allow-missing] [--quick] [--spacing MM]

Per scan (manifest row): files present and unchanged (sha256), image/mask/seg on one RAI grid
equal to the recorded one, at the row's working spacing (1 mm unless prepared with --spacing;
`--spacing MM` requires that value of every scan), voxel types, finite intensities that are not
constant and mostly positive inside the brain, a non-empty mask in [0, 1] with a plausible brain
volume, a binary seg, and counts equal to the recorded ones; the `mask/`/`seg/` links of the split
CSVs. With --splits: every file the loader (`p2l.splits`) would open for every split row exists,
and its image, mask and seg share a grid. Prints a summary; exits 1 when anything is wrong.

--quick reads headers, not voxels or hashes, but still catches a truncated file: a .nii.gz must
end with a gzip trailer whose length field equals the header's size (offset + voxels); only when
it does not (a truncated or multi-member file) is the stream decompressed once to tell which. A
.nii must be at least that long. Damage inside an intact-length stream needs the full mode.
"""

from __future__ import annotations

import argparse
import gzip
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.adapters import DATASETS, shared_paths
from data_prep.manifest import MANIFEST_NAME, read_manifest, verify_outputs
from p2l.errors import DataError, P2LError
from p2l.preparation.ants_io import sha256_file
from p2l.preparation.skull_strip import PLAUSIBLE_BRAIN_ML
from p2l.splits import read_ixi_split, read_test_split

_DTYPES = {"image": "float32", "mask": "float32", "seg": "uint8"}
_AXCODES = "LPS"  # ITK's RAI, as nibabel names it
_MAX_NONPOSITIVE = 0.2  # share of brain voxels <= 0 above which intensities are implausible
_AFFINE_ATOL = 1e-4
_LISTED = 3
_CHUNK = 1 << 20


@dataclass
class Report:
    """Errors and warnings of one dataset folder."""

    folder: Path
    scans: int = 0
    modalities: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def row_spacing(row: dict) -> float:
    """The working grid (mm) a manifest row was prepared on (rows before --spacing: 1 mm)."""
    return float(row.get("spacing_mm", row.get("config", {}).get("spacing", 1.0)))


def _check_row(
    folder: Path, row: dict, report: Report, quick: bool, spacing: float | None = None
) -> None:
    name = f"{row['subject']} {row['modality']}"
    recorded = row_spacing(row)
    if spacing is not None and not np.isclose(recorded, spacing):
        report.errors.append(f"{name}: prepared at {recorded:g} mm, expected {spacing:g} mm")
    spacing = recorded
    if quick:
        missing = [
            f"{kind} file missing: {folder / rec['path']}"
            for kind, rec in row["outputs"].items()
            if not (folder / rec["path"]).is_file()
        ]
        problems = missing
    else:
        problems = verify_outputs(folder, row)
    if problems:
        report.errors += [f"{name}: {p}" for p in problems]
        return
    headers = {}
    for kind, rec in row["outputs"].items():
        path = folder / rec["path"]
        problem = _header_problem(path)
        if isinstance(problem, str):
            report.errors.append(f"{name}: {path}: {problem}")
        else:
            headers[kind] = problem
    if len(headers) < len(row["outputs"]):
        return
    for kind, img in headers.items():
        rec = row["outputs"][kind]
        where = f"{name}: {rec['path']}"
        if list(img.shape) != rec["shape"]:
            report.errors.append(f"{where}: shape {img.shape} differs from manifest {rec['shape']}")
        if not np.allclose(img.affine, rec["affine"], atol=_AFFINE_ATOL):
            report.errors.append(f"{where}: affine differs from the manifest")
        if not np.allclose(img.header.get_zooms()[:3], spacing, atol=1e-3):
            zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
            report.errors.append(f"{where}: spacing {zooms} is not {spacing:g} mm")
        if "".join(nib.aff2axcodes(img.affine)) != _AXCODES:
            codes = "".join(nib.aff2axcodes(img.affine))
            report.errors.append(f"{where}: orientation {codes}, expected RAI (nibabel {_AXCODES})")
        if str(img.get_data_dtype()) != _DTYPES[kind]:
            report.errors.append(f"{where}: voxel type {img.get_data_dtype()}, not {_DTYPES[kind]}")
    image = headers["image"]
    for kind, img in headers.items():
        if kind != "image" and (
            img.shape != image.shape or not np.allclose(img.affine, image.affine, atol=_AFFINE_ATOL)
        ):
            report.errors.append(f"{name}: {kind} is not on the image grid (shape or affine)")
    if quick or report.errors and report.errors[-1].startswith(name):
        return
    data = {k: np.asarray(v.dataobj) for k, v in headers.items()}
    _check_data(name, data, row, report, spacing**3 / 1000.0)


def _header_problem(path: Path):
    """The loaded header, or why the file is unusable (unreadable header, truncated data)."""
    try:
        img = nib.load(path)
        proxy = img.dataobj  # the on-disk layout (the loaded header's vox_offset reads 0)
        expected = proxy.offset + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    except Exception as err:  # nibabel raises many types for a damaged header
        return f"cannot read the NIfTI header ({' '.join(str(err).split())})"
    problem = _truncation(path, int(expected))
    return problem if problem else img


def _truncation(path: Path, expected: int) -> str | None:
    """Whether `path` holds fewer than `expected` bytes of header and voxels (see --quick)."""
    if not path.name.endswith(".gz"):
        size = path.stat().st_size
        return f"truncated: {size} of {expected} bytes" if size < expected else None
    with open(path, "rb") as f:
        f.seek(-4, 2)  # a gzip member ends with CRC32 and ISIZE (length mod 2**32)
        if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
            return None
    try:
        total = _gzip_length(path)
    except (EOFError, OSError, zlib.error) as err:
        return f"truncated or corrupt gzip stream ({err})"
    return f"truncated: {total} of {expected} bytes" if total < expected else None


def _gzip_length(path: Path) -> int:
    """Decompressed length of every gzip member of `path`, read through once."""
    total = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
    return total


def _check_data(
    name: str, data: dict[str, np.ndarray], row: dict, report: Report, voxel_ml: float = 1e-3
) -> None:
    image, mask = data["image"].astype(np.float64), data["mask"]
    if not np.all(np.isfinite(image)):
        report.errors.append(f"{name}: image has non-finite voxels")
        return
    if mask.min() < -1e-6 or mask.max() > 1 + 1e-6:
        report.errors.append(f"{name}: mask values outside [0, 1] ({mask.min():g}..{mask.max():g})")
    inside = mask > 0
    count = int(inside.sum())
    if count == 0:
        report.errors.append(f"{name}: empty brain mask")
        return
    if count != row["brain_mask"]["voxels_gt0"]:
        report.errors.append(
            f"{name}: brain mask has {count} voxels > 0, manifest says "
            f"{row['brain_mask']['voxels_gt0']}"
        )
    brain_ml = float(np.count_nonzero(mask >= 0.5)) * voxel_ml
    lo, hi = PLAUSIBLE_BRAIN_ML
    if not lo <= brain_ml <= hi:
        report.errors.append(f"{name}: implausible brain volume {brain_ml:.0f} mL ({lo}-{hi})")
    values = image[inside]
    p1, p50, p99 = np.percentile(values, [1, 50, 99])
    if not p99 > p1:
        report.errors.append(
            f"{name}: implausible intensities: constant inside the brain ({p50:g})"
        )
    nonpositive = float(np.mean(values <= 0))
    if nonpositive > _MAX_NONPOSITIVE:
        report.errors.append(
            f"{name}: implausible intensities: {nonpositive:.0%} of brain voxels are <= 0"
        )
    expected = row["intensity"]["p50"]
    if not np.isclose(p50, expected, rtol=1e-3, atol=1e-3):
        report.errors.append(f"{name}: brain median {p50:.4g} differs from manifest {expected:.4g}")
    if "seg" in data:
        seg = data["seg"]
        if not np.all(np.isin(seg, (0, 1))):
            report.errors.append(
                f"{name}: segmentation is not binary (values {np.unique(seg)[:6]})"
            )
        lesion = row.get("lesion", {})
        if int(np.count_nonzero(seg)) != lesion.get("voxels_gt0"):
            report.errors.append(
                f"{name}: segmentation has {int(np.count_nonzero(seg))} lesion voxels, manifest "
                f"says {lesion.get('voxels_gt0')}"
            )


def _check_shared(root: Path, spec_key: str, rows: dict, report: Report, quick: bool) -> None:
    """mask/ and seg/ (the CSV paths) must be a copy of one modality's files for every subject."""
    spec = DATASETS[spec_key]
    for subject in sorted({sid for sid, _ in rows}):
        for kind, path in shared_paths(root, spec, subject).items():
            if not path.is_file():
                report.errors.append(f"{subject}: {kind}/ file missing: {path}")
                continue
            if quick:
                problem = _header_problem(path)
                if isinstance(problem, str):
                    report.errors.append(f"{subject}: {path}: {problem}")
                continue
            recorded = {
                rows[(subject, m)]["outputs"][kind]["sha256"]
                for m in spec.modalities
                if (subject, m) in rows
            }
            if sha256_file(path) not in recorded:
                report.errors.append(f"{subject}: {path} matches none of its modalities' {kind}s")


def _check_stray(folder: Path, rows: dict, report: Report) -> None:
    recorded = {folder / rec["path"] for row in rows.values() for rec in row["outputs"].values()}
    pattern = re.compile(r"^(?:mask_|seg_)?(?:t1|t2|t1c|flair)$")
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and pattern.match(p.name)):
        stray = [p for p in sorted(sub.glob("*.nii*")) if p not in recorded]
        if stray:
            report.warnings.append(
                f"{len(stray)} file(s) in {sub} not in the manifest, e.g. {stray[0].name}"
            )


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root.absolute()))
    except ValueError:
        return path


def _split_files(splits: Path, spec_key: str, folder_name: str) -> list[tuple[str, str, int]]:
    """(csv name, part, fold) of every split file that names this dataset folder."""
    if spec_key == "ixi":
        found = []
        for path in sorted(splits.glob("IXI_*_fold*.csv")) + [splits / "IXI_test.csv"]:
            match = re.match(r"IXI_(train|val)_fold(\d+)\.csv$", path.name)
            if path.is_file():
                found.append(
                    (path.name, *((match.group(1), int(match.group(2))) if match else ("test", 0)))
                )
        return found
    return [
        (f"{folder_name}_{part}.csv", part, 0)
        for part in ("test", "val")
        if (splits / f"{folder_name}_{part}.csv").is_file()
    ]


def _same_grid(paths: list[str]) -> bool:
    headers = [nib.load(p) for p in paths]
    first = headers[0]
    return all(
        h.shape == first.shape and np.allclose(h.affine, first.affine, atol=_AFFINE_ATOL)
        for h in headers[1:]
    )


def _check_splits(
    root: Path,
    splits: Path,
    spec_key: str,
    folder: Path,
    modalities: set[str],
    report: Report,
    allow_missing: bool,
) -> None:
    files = _split_files(splits, spec_key, folder.name)
    if not files:
        report.warnings.append(f"no split CSV in {splits} names {folder.name}")
    for modality in sorted(modalities):
        for csv, part, fold in files:
            try:
                if spec_key == "ixi":
                    rows = read_ixi_split(splits, part, fold, modality, root, check_files=False)
                else:
                    rows = read_test_split(
                        splits, folder.name, modality, root, part, check_files=False
                    )
            except DataError as err:
                # e.g. no subject of this CSV has a T2 scan (avail_t2.csv): nothing to check.
                empty = err.problem.startswith("no rows to use")
                (report.warnings if empty else report.errors).append(str(err))
                continue
            missing, grid = [], []
            for row in rows:
                paths = [row.image_path, row.mask_path] + ([row.seg_path] if row.seg_path else [])
                absent = [p for p in paths if not Path(p).is_file()]
                if absent:
                    missing.append(_relative(absent[0], root))
                elif not _same_grid(paths):
                    grid.append(_relative(row.image_path, root))
            if missing:
                message = (
                    f"{csv} ({modality}): {len(missing)} of {len(rows)} rows lack files, "
                    f"e.g. {', '.join(missing[:_LISTED])}"
                )
                (report.warnings if allow_missing else report.errors).append(message)
            if grid:
                report.errors.append(
                    f"{csv} ({modality}): {len(grid)} rows whose image, mask and seg are on "
                    f"different grids (the loader would refuse them), e.g. {grid[0]}"
                )


def validate(
    root: str | Path,
    splits: str | Path | None = None,
    allow_missing: bool = False,
    quick: bool = False,
    spacing: float | None = None,
) -> list[Report]:
    """Validate every dataset folder of a prepared root; raises DataError when there is none.

    `spacing`: the working grid every scan must have (None: each row's own, from the manifest).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "prepared data root not found")
    by_folder = {spec.folder: spec.key for spec in DATASETS.values()}
    reports = []
    for relative, key in sorted(by_folder.items()):
        folder = root / relative
        if not folder.is_dir():
            continue
        report = Report(folder)
        reports.append(report)
        if not (folder / MANIFEST_NAME).is_file():
            report.errors.append(f"{folder}: no {MANIFEST_NAME} (not written by data_prep.prepare)")
            continue
        try:
            rows = read_manifest(folder)
        except DataError as err:
            report.errors.append(str(err))
            continue
        report.scans = len(rows)
        report.modalities = {m for _, m in rows}
        if not rows:
            report.errors.append(f"{folder}: the manifest lists no scans")
        for row in rows.values():
            _check_row(folder, row, report, quick, spacing)
        _check_shared(root, key, rows, report, quick)
        _check_stray(folder, rows, report)
        if splits is not None:
            _check_splits(root, Path(splits), key, folder, report.modalities, report, allow_missing)
    if not reports:
        raise DataError(root, "no prepared dataset folder (Train/ixi, Test/<Dataset>) found")
    return reports


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints a summary; 0 when valid, 1 when not."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.validate", description=__doc__)
    parser.add_argument("root", help="prepared data root (holds Train/ and/or Test/)")
    parser.add_argument("--splits", default=None, help="split CSV folder to check against")
    parser.add_argument(
        "--allow-missing", action="store_true", help="split rows without files are warnings"
    )
    parser.add_argument(
        "--quick", action="store_true", help="headers and file lengths only: no hashes, no voxels"
    )
    parser.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="require this working grid (mm) of every scan (default: each row's, as prepared)",
    )
    args = parser.parse_args(argv)
    try:
        reports = validate(args.root, args.splits, args.allow_missing, args.quick, args.spacing)
    except P2LError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    errors = 0
    for report in reports:
        status = "OK" if not report.errors else f"{len(report.errors)} error(s)"
        mods = ",".join(sorted(report.modalities)) or "-"
        print(f"{report.folder}: {report.scans} scans ({mods}): {status}")
        for message in report.errors:
            print(f"  ERROR {message}")
        for message in report.warnings:
            print(f"  warning {message}")
        errors += len(report.errors)
    scans = sum(r.scans for r in reports)
    if errors:
        print(f"data_prep.validate: FAILED, {errors} error(s) in {len(reports)} folder(s)")
        return 1
    print(f"data_prep.validate: OK, {scans} scans in {len(reports)} folder(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
