"""One scan through `p2l.detect`: prepare (raw) or check (prepared), score, map back, write.

Raw scans get the run's own preparation (p2l.preparation.raw_scan, spec §2.1) and every map is
carried back through the inverse of the registration onto the raw scan's grid and affine.
Prepared scans (already skull-stripped, registered, at the training spacing) are only brought to
the training orientation by an exact axis permutation/flip (p2l.orientation) and mapped back the
same way. In both cases the normalisation, sliding-window heatmap and post-processing are the
evaluation's (spec §2.2, §5), and the threshold is the one the run's evaluation stored.

Outputs are first written to a hidden folder next to the output prefix and moved into place only
when every file of the scan is complete: a scan that fails leaves no file behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2l.errors import DataError, P2LError

MODES = ("auto", "raw", "prepared")


@dataclass(frozen=True)
class ScanOptions:
    """Per-scan choices of the command line."""

    mode: str = "auto"  # auto | raw | prepared
    brain_mask: str | None = None
    skull_strip: str = "auto"  # raw scans: auto | hd-bet | atlas | none
    atlas: str | None = None  # the run's atlas file, when it moved since training
    log: object = None  # print-like: one line per finished step (single scans; batch shows a bar)


def scan_name(path: str | Path) -> str:
    """The scan's file name without .nii / .nii.gz (the default output prefix)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_mode(run, path: str | Path, options: ScanOptions) -> tuple[str, str]:
    """("raw" | "prepared", why). auto: prepared when data_prep's manifest lists the scan (it is
    one of the run's layout's prepared files) or when the run's training data have no
    preparation record (nothing to repeat); raw otherwise."""
    if options.mode not in MODES:
        raise DataError(path, f"mode must be one of {MODES}, got {options.mode!r}")
    if options.mode != "auto":
        return options.mode, f"--{options.mode}"
    from p2l.preparation import record

    if record.from_manifest(path) is not None:
        return "prepared", "listed in a data_prep manifest next to it"
    if not run.has_preparation():
        return "prepared", "the run's training data have no preparation record (data_prep)"
    return "raw", "not a data_prep output: prepared like the run's training data"


class _Clock:
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def add(self, name: str, start: float) -> None:
        self.steps.append({"name": name, "seconds": round(time.perf_counter() - start, 2)})


def detect_scan(run, path: str | Path, prefix: str | Path, options: ScanOptions) -> dict:
    """Score the scan at `path` with `run` (p2l.detect_run); write PREFIX_* files; return the
    report (also written as PREFIX_report.json)."""
    from p2l import detect_report

    path, prefix = Path(path), Path(prefix)
    clock, started = _Clock(), time.perf_counter()
    mode, why = resolve_mode(run, path, options)
    prepared = None
    if mode == "raw":
        prepared = _prepare_raw(run, path, options)
        clock.steps.extend(prepared.steps)
        image, mask = _as_volumes(prepared, path)
    else:
        image, mask = _read_prepared(path, options.brain_mask, clock)
    subject = _normalised(run, image, mask, path, check_extent=prepared is None)

    start = time.perf_counter()
    if options.log is not None:
        options.log(f"p2l.detect: heatmap at stride {run.config.eval.stride} ...")
    sv = run.opened.scorer(subject.subject_id, subject.image, subject.mask)
    clock.add("inference", start)
    maps, masks = _maps(run, sv, subject)

    start = time.perf_counter()
    if prepared is None:
        out_maps = {k: subject.to_source(v, fill=0) for k, v in maps.items()}
        out_masks = {k: subject.to_source(v, fill=0).astype(np.uint8) for k, v in masks.items()}
        affine, raw_image = subject.source_affine, image.data
    else:
        out_maps = {k: prepared.to_raw(subject.to_source(v, fill=0)) for k, v in maps.items()}
        out_masks = {
            k: prepared.to_raw(subject.to_source(v, fill=0), kind="mask") for k, v in masks.items()
        }
        affine, raw_image = prepared.raw_affine, prepared.raw_image
    clock.add("map_back", start)

    report = detect_report.build(
        run, path, mode, why, prepared, sv, subject, out_maps, out_masks, affine
    )
    _write_all(prefix, out_maps, out_masks, affine, raw_image, report, clock, started)
    return report


def _prepare_raw(run, path: Path, options: ScanOptions):
    from p2l.preparation import raw_scan

    try:
        return raw_scan.prepare_raw(
            path,
            run.preparation(),
            run.atlas(options.atlas),
            skull_strip_method=options.skull_strip,
            brain_mask=options.brain_mask,
            log=options.log,
        )
    except P2LError:
        raise
    except Exception as err:  # ITK / ANTs failures arrive as RuntimeError with a C++ trace
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(path, f"preparation failed: {first}") from err


def _as_volumes(prepared, path: Path):
    from p2l.preparation.raw_scan import itk_ras_affine
    from p2l.volume_io import Volume

    affine = itk_ras_affine(prepared.image)
    image = Volume(prepared.image.numpy().astype(np.float32), affine, f"{path} (prepared)")
    mask = Volume(prepared.mask.numpy().astype(np.float32), affine, f"{path} (brain mask)")
    return image, mask


def _read_prepared(path: Path, brain_mask: str | None, clock: _Clock):
    from p2l.volume_io import read_volume

    start = time.perf_counter()
    image = read_volume(path, kind="image")
    mask = read_volume(brain_mask, kind="mask") if brain_mask else derive_brain_mask(image, path)
    clock.add("read", start)
    return image, mask


def derive_brain_mask(image, path: Path):
    """Non-zero voxels of a skull-stripped scan; refuses scans with no zero background."""
    from p2l.volume_io import Volume

    nonzero = image.data != 0
    fraction = float(nonzero.mean())
    if fraction > 0.9 or not nonzero.any():
        raise DataError(
            path,
            f"{100 * fraction:.0f} % of voxels are non-zero: the scan does not look "
            "skull-stripped, so no brain mask can be derived. Pass --brain-mask, or --raw to "
            "prepare it like the training data",
        )
    print(f"p2l.detect: no --brain-mask given; using the {nonzero.sum():,} non-zero voxels of "
          "the skull-stripped scan as the brain mask")  # fmt: skip
    return Volume(nonzero.astype(np.float32), image.affine, f"{path} (non-zero voxels)")


def _normalised(run, image, mask, path: Path, check_extent: bool):
    from p2l import normalization, orientation

    space = run.space
    # Without any record of the training orientation the scan's own is the only choice.
    target = image.axcodes if space is None else tuple(space["axcodes"])
    config = run.config
    subject = normalization.prepare_subject(
        image,
        mask,
        None,
        modality=run.modality,
        subject_id=scan_name(path),
        target_shape=tuple(config.data.image_shape),
        expected_spacing=config.data.expected_spacing,
        orientation=target,
        spacing=None if space is None else space["spacing"],
    )
    reorientation = subject.reorientation
    if check_extent:
        if not reorientation.is_identity:
            print(f"p2l.detect: {path} is stored as {''.join(image.axcodes)}, the model was "
                  f"trained on {''.join(target)} volumes: axes permuted/flipped to match (no "
                  "resampling); outputs are mapped back to the scan's own grid")  # fmt: skip
        orientation.check_registered(
            reorientation, reorientation.apply(mask.data), space, source=path
        )
    return subject


def _maps(run, sv, subject) -> tuple[dict, dict]:
    """(continuous maps, binary masks) on the normalised grid."""
    from p2l import thresholds

    brain = subject.mask > 0
    prediction = thresholds.predict(sv.score, run.threshold) & brain
    maps = {"score": sv.score}
    for name in ("error", "logvar"):  # Patch2Loc's heatmap parts (a DAE run has none)
        if name in sv.maps:
            maps[name] = sv.maps[name] * brain
    masks = {"mask": prediction.astype(np.uint8), "brain": brain.astype(np.uint8)}
    if run.fused:
        maps["dae"] = sv.maps["dae"]
        maps["fused"] = sv.maps[run.fused]
        if run.fused_threshold is not None:
            fused = thresholds.predict(sv.maps[run.fused], run.fused_threshold[0]) & brain
            masks["fused_mask"] = fused.astype(np.uint8)
    return maps, masks


def _write_all(prefix: Path, maps, masks, affine, image, report, clock, started) -> None:
    """Every output into a hidden folder first, then moved next to `prefix` (nothing half-written
    is left by a failure). The report, written last, gets the steps (the write of the maps and
    the overlay included), the total seconds and the final output paths."""
    from p2l import detect_figure, detect_report
    from p2l.volume_io import write_volume_atomic

    start = time.perf_counter()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix.name}.partial-", dir=prefix.parent))
    try:
        staged = {}
        for name, array in maps.items():
            staged[name] = staging / f"{prefix.name}_{name}.nii.gz"
            write_volume_atomic(staged[name], array, affine, dtype=np.float32)
        for name, array in masks.items():
            staged[name] = staging / f"{prefix.name}_{name}.nii.gz"
            write_volume_atomic(staged[name], array, affine, dtype=np.uint8)
        staged["overlay"] = staging / f"{prefix.name}_overlay.png"
        detect_figure.overlay(
            staged["overlay"], image, maps["score"], masks["brain"], masks["mask"], affine,
            title=detect_report.figure_title(report),
        )  # fmt: skip
        staged["report"] = staging / f"{prefix.name}_report.json"
        clock.add("write", start)
        report["steps"] = clock.steps
        report["seconds_total"] = round(time.perf_counter() - started, 2)
        report["outputs"] = {k: str(prefix.with_name(p.name)) for k, p in staged.items()}
        detect_report.write_json(staged["report"], report)
        for path in staged.values():
            path.replace(prefix.with_name(path.name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
