"""Lesion maps for scans straight from the scanner, or already prepared ones, in one command:

    python -m p2l.detect --workdir RUN --input raw.nii.gz --output out/case
    python -m p2l.detect --workdir RUN --input scans/ --output out/        (a folder or a CSV)

A raw head scan (any orientation and voxel size, with skull) gets the preparation the run's
training data had, read from the run (spacing, skull stripping, atlas, N4: data_prep's manifest,
p2l.preparation.record): reorient/resample, skull stripping (HD-BET when its `hd-bet` command is
installed, else the offline atlas method, named in the report), affine registration to the run's
atlas, crop, N4 (spec §2.1); then the training-time normalisation (spec §2.2), the sliding-window
heatmap and post-processing (spec §5), and every map is carried back through the inverse of the
registration onto the input's own grid and affine (p2l.preparation.raw_scan).

A prepared scan (skull-stripped, registered, at the training spacing: `--prepared`, or any scan a
data_prep manifest lists, or every scan of a run whose data have no preparation record, e.g. the
demo) is only brought to the training orientation by an exact axis permutation/flip and back.

Per scan: PREFIX_score / _error / _logvar / _brain / _mask .nii.gz on the input's grid and affine
(open them over the input in ITK-SNAP, FSLeyes or 3D Slicer), PREFIX_overlay.png (the axial
slices with most flagged voxels) and PREFIX_report.json (seconds per step, threshold and its
source, flagged ml, largest components in world mm, out-of-distribution warnings). The mask
threshold is the one `make eval` stored in RUN/results/summary.json (validation-tuned if
available, else the healthy quantile's) or --threshold.

Batch: --input a folder (every .nii/.nii.gz) or a CSV (column `input`, optional `brain_mask`);
--output a folder. One progress bar, one table (OUTPUT/detect_report.csv); a failing scan is
reported with its reason and the others are completed. Exit status 1 if any scan failed.

With `--dae-workdir D` (a DAE run trained on the same data, experiments/dae_*.py) the scan is also
scored by the DAE and the two maps are fused by `--fusion` (p2l.fusion): PREFIX_dae and
PREFIX_fused, and PREFIX_fused_mask at the fused map's stored threshold when the Patch2Loc run was
evaluated fused with D (`eval.pixel_workdir`), whose healthy statistics zsum and gate need.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from p2l import fusion, xla_flags

# Re-exported: the run-side helpers moved to p2l.detect_run.
from p2l.detect_run import stored_summary, stored_threshold  # noqa: F401
from p2l.detect_scan import ScanOptions, detect_scan, scan_name
from p2l.errors import DataError, P2LError

SCAN_SUFFIXES = (".nii", ".nii.gz")


def _options(args, log=None) -> ScanOptions:
    mode = "raw" if args.raw else "prepared" if args.prepared else "auto"
    return ScanOptions(mode=mode, brain_mask=args.brain_mask, skull_strip=args.skull_strip,
                       atlas=args.atlas, log=log)  # fmt: skip


def _open(args):
    from p2l.detect_run import open_detect_run

    return open_detect_run(
        args.workdir,
        modality=args.modality,
        threshold=args.threshold,
        stride=args.stride,
        dae_workdir=args.dae_workdir,
        fusion_rule=args.fusion,
    )


def detect(args) -> dict[str, Path]:
    """One scan (`--input` a file); returns {output name: path}. Raises P2LError."""
    run = _open(args)
    report = detect_scan(run, args.input, args.output, _options(args, log=_progress))
    print("\n".join(_summary_lines(report)))
    return {k: Path(v) for k, v in report["outputs"].items()}


def _progress(line: str) -> None:
    print(line, flush=True)


def _summary_lines(report):
    from p2l.detect_report import summary_lines

    return summary_lines(report)


def list_inputs(source: Path) -> list[tuple[str, str | None]]:
    """(scan, brain mask or None) of a folder (every NIfTI in it, sorted) or a CSV (`input`
    column, optional `brain_mask`; relative paths are relative to the CSV)."""
    if source.is_dir():
        scans = sorted(p for p in source.iterdir() if p.name.endswith(SCAN_SUFFIXES))
        if not scans:
            raise DataError(source, "no .nii or .nii.gz files in this folder")
        return [(str(p), None) for p in scans]
    with open(source, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "input" not in rows[0]:
        raise DataError(source, "a scan list needs a header with an `input` column")

    def resolve(value):
        path = Path(value)
        return str(path if path.is_absolute() else source.parent / path)

    return [
        (resolve(r["input"]), resolve(r["brain_mask"]) if r.get("brain_mask") else None)
        for r in rows
        if r["input"].strip()
    ]


def is_batch(path: Path) -> bool:
    return path.is_dir() or path.name.lower().endswith(".csv")


def detect_batch(args) -> list[dict]:
    """Every scan of a folder or CSV; returns the table rows (failures included)."""
    from tqdm import tqdm

    from p2l.detect_report import table_row, write_table

    inputs = list_inputs(Path(args.input))
    names = [scan_name(scan) for scan, _ in inputs]
    if len(set(names)) != len(names):
        raise DataError(args.input, "two scans share a file name: outputs would overwrite")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    run = _open(args)
    rows = []
    for (scan, mask), name in tqdm(list(zip(inputs, names)), desc="detect", unit="scan"):
        options = _options(args)
        if mask is not None:
            options = ScanOptions(options.mode, mask, options.skull_strip, options.atlas, None)
        start = time.perf_counter()
        try:
            report = detect_scan(run, scan, out / name, options)
            rows.append(table_row(scan, report))
        except P2LError as err:
            rows.append(table_row(scan, None, str(err), time.perf_counter() - start))
            tqdm.write(f"failed: {err}", file=sys.stderr)
    write_table(out / "detect_report.csv", rows)
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"p2l.detect: {len(rows) - failed} of {len(rows)} scans done, {failed} failed; "
          f"table {out / 'detect_report.csv'}")  # fmt: skip
    for r in rows:
        print(
            f"  {r['status']:6s} {Path(r['scan']).name}: "
            + (r["error"] if r["status"] == "failed" else f"{r['flagged_ml']} ml flagged")
        )
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="trained run folder (make train)")
    ap.add_argument("--input", required=True, help="a scan, a folder of scans, or a CSV")
    ap.add_argument("--output", required=True, help="prefix (out/case); a folder for several")
    ap.add_argument("--brain-mask", help="brain mask on the scan's grid (one scan)")
    ap.add_argument("--modality", choices=("t1", "t2"),
                    help="checked against the run's (default: the run's)")  # fmt: skip
    mode = ap.add_mutually_exclusive_group()
    raw_help = "prepare the scan like the training data (the default, see above)"
    mode.add_argument("--raw", action="store_true", help=raw_help)
    prepared_help = "already skull-stripped, registered, at the run's spacing"
    mode.add_argument("--prepared", action="store_true", help=prepared_help)
    strip_help = "raw scans: auto = none if stripped, hd-bet if installed, else atlas"
    strip_choices = ("auto", "hd-bet", "atlas", "none")
    ap.add_argument("--skull-strip", default="auto", choices=strip_choices, help=strip_help)
    ap.add_argument("--atlas", help="the run's atlas file, if it moved since training")
    ap.add_argument("--threshold", type=float, help="score threshold for the mask")
    ap.add_argument("--stride", type=int, help="sliding-window stride (default: the config's)")
    ap.add_argument(
        "--dae-workdir",
        help="a trained DAE run on the same data: also write its map "
        "(PREFIX_dae) and the fused one (PREFIX_fused, PREFIX_fused_mask)",
    )
    ap.add_argument(
        "--fusion",
        default="product",
        choices=fusion.RULES,
        help="fusion rule with --dae-workdir (p2l.fusion; default product)",
    )
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    xla_flags.apply()  # before JAX starts its backend
    # Raw scans: ANTs' multi-threaded registration sums its sampled metric in a thread-dependent
    # order, so two runs on one scan can end in different optima (measured: brain masks of 1137
    # to 1613 ml for one WMH head). One ITK thread makes preparation repeatable; it must be set
    # before ITK starts.
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    try:
        if is_batch(Path(args.input)):
            rows = detect_batch(args)
            return 1 if any(r["status"] == "failed" for r in rows) else 0
        detect(args)
    except P2LError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
