"""The report `p2l.detect` writes per scan (PREFIX_report.json) and prints, and the batch table.

Per scan: each step's seconds, the threshold and where it came from, the flagged volume in ml,
the largest flagged components with their centres in the input's world coordinates (RAS mm, as
viewers show them), and out-of-distribution warnings: the scan's in-brain statistics against the
range of the healthy validation volumes (summary["healthy_reference"], stored by `make eval`),
and, for raw scans, the contrast against the run's modality (the correlation with the T1 atlas
after registration is positive for T1 scans, negative for T2: p2l.preparation.raw_scan).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from p2l.atomic_write import write_text_atomic

TOP_COMPONENTS = 5
# A statistic is out of distribution when it lies more than this many healthy standard
# deviations outside the healthy volumes' [min, max].
OOD_MARGIN_STD = 3.0
# |correlation with the T1 atlas| below this: the contrast cannot be told (no warning either way).
_CONTRAST_MIN = 0.1
TABLE_COLUMNS = ("scan", "status", "mode", "flagged_ml", "components", "largest_ml",
                 "largest_centre_mm", "warnings", "seconds", "error")  # fmt: skip


def _voxel_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def components(mask: np.ndarray, score: np.ndarray, affine: np.ndarray) -> list[dict]:
    """The largest connected flagged regions (26-connectivity): size and centre in world mm."""
    labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:TOP_COMPONENTS] + 1
    centres = ndimage.center_of_mass(mask > 0, labels, order)
    peaks = ndimage.maximum(score, labels, order)
    out = []
    for label, centre, peak in zip(order, centres, peaks, strict=True):
        world = np.asarray(affine) @ np.append(np.asarray(centre), 1.0)
        out.append({
            "voxels": int(sizes[label - 1]),
            "ml": round(int(sizes[label - 1]) * _voxel_ml(affine), 3),
            "centre_world_mm": [round(float(v), 1) for v in world[:3]],
            "centre_voxel": [round(float(v), 1) for v in centre],
            "peak_score": round(float(peak), 4),
        })  # fmt: skip
    return out


def scan_statistics(run, sv, subject) -> dict:
    """The statistics the healthy reference holds, for this scan (normalised grid, in brain)."""
    from p2l.eval_thresholds import volume_statistics

    brain = subject.mask > 0
    stats = volume_statistics(sv.maps, run.opened.names[run.opened.primary], brain)
    reference = (run.summary or {}).get("healthy_reference") or {}
    threshold = reference.get("threshold", run.threshold)
    stats["fraction_above"] = float(np.mean(sv.score[brain] > threshold)) if brain.any() else 0.0
    return stats


def ood_warnings(run, stats: dict, prepared) -> tuple[list[str], dict | None]:
    """(warnings, the healthy reference used or None)."""
    warnings = []
    reference = (run.summary or {}).get("healthy_reference")
    if reference:
        for key, value in stats.items():
            ref = reference["statistics"].get(key)
            if ref is None:
                continue
            lo = ref["min"] - OOD_MARGIN_STD * ref["std"]
            hi = ref["max"] + OOD_MARGIN_STD * ref["std"]
            if not lo <= value <= hi:
                warnings.append(
                    f"{key} {value:.4g} is outside the healthy range [{ref['min']:.4g}, "
                    f"{ref['max']:.4g}] of {reference['volumes']} healthy validation volumes: the "
                    "scan does not look like the training data (or is largely abnormal)"
                )
    if prepared is not None:
        corr = prepared.checks["atlas_correlation"]
        looks = "T1" if corr >= _CONTRAST_MIN else "T2" if corr <= -_CONTRAST_MIN else None
        if looks is not None and looks != run.modality.upper():
            warnings.append(
                f"the scan's contrast looks {looks} (correlation {corr:+.2f} with the T1 atlas "
                f"after registration), but the run was trained on {run.modality.upper()} scans"
            )
    return warnings, reference


def build(run, path, mode, why, prepared, sv, subject, maps, masks, affine) -> dict:
    """The report of one scan (without steps/outputs, which the caller adds last)."""
    voxel_ml = _voxel_ml(affine)
    flagged = int(masks["mask"].sum())
    brain = int(masks["brain"].sum())
    stats = scan_statistics(run, sv, subject)
    warnings, reference = ood_warnings(run, stats, prepared)
    report = {
        "scan": str(path),
        "mode": mode,
        "mode_reason": why,
        "run": str(run.workdir),
        "checkpoint_step": int(run.opened.step),
        "modality": run.modality,
        "detector": run.opened.primary,
        "threshold": {"value": run.threshold, "source": run.threshold_source},
        "stride": int(run.config.eval.stride),
        # Opening the run (checkpoint, compilation) is not in the scan's steps: paid once per batch.
        "run_open_seconds": run.open_seconds,
        "grid": {
            "shape": [int(n) for n in masks["mask"].shape],
            "affine": np.round(np.asarray(affine), 6).tolist(),
            "voxel_ml": voxel_ml,
        },
        "flagged": {
            "voxels": flagged,
            "ml": round(flagged * voxel_ml, 3),
            "brain_ml": round(brain * voxel_ml, 1),
            "fraction_of_brain": round(flagged / brain, 5) if brain else 0.0,
        },
        "components": components(masks["mask"], maps["score"], affine),
        "out_of_distribution": {
            "warnings": warnings,
            "statistics": {k: round(v, 5) for k, v in stats.items()},
            "healthy_reference": reference,
        },
    }
    if prepared is not None:
        prep = run.preparation()
        report["preparation"] = {
            "skull_strip": prepared.skull_strip,
            "checks": prepared.checks,
            "spacing_mm": prep["spacing_mm"],
            "atlas": prep["atlas"]["name"],
            "training_skull_strip": prep["skull_strip_used"],
        }
    if run.fused:
        fused = run.fused_threshold
        report["fused"] = {
            "detector": run.fused,
            "threshold": None if fused is None else {"value": fused[0], "source": fused[1]},
            "flagged_ml": None
            if "fused_mask" not in masks
            else round(int(masks["fused_mask"].sum()) * voxel_ml, 3),
        }
    return report


def figure_title(report: dict) -> str:
    t = report["threshold"]
    return (f"{Path(report['scan']).name}: {report['flagged']['ml']:.1f} ml flagged at "
            f"{t['value']:.4g} ({t['source'].split(' ')[0]})")  # fmt: skip


def write_json(path: Path, report: dict) -> None:
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def summary_lines(report: dict) -> list[str]:
    """The short printed summary of one scan."""
    lines = [
        f"p2l.detect: {report['scan']} ({report['mode']}: {report['mode_reason']})",
        f"  threshold {report['threshold']['value']:.4g} from {report['threshold']['source']}; "
        f"{report['flagged']['ml']:.2f} ml flagged of {report['flagged']['brain_ml']:.0f} ml brain "
        f"in {len(report['components'])} largest component(s)",
    ]
    prep = report.get("preparation")
    if prep:
        lines.append(f"  skull stripping: {prep['skull_strip']['method']} "
                     f"({prep['skull_strip']['quality']})")  # fmt: skip
    for c in report["components"][:3]:
        lines.append(f"  component {c['ml']:.2f} ml at {c['centre_world_mm']} mm (RAS), peak "
                     f"{c['peak_score']:.4g}")  # fmt: skip
    for w in report["out_of_distribution"]["warnings"]:
        lines.append(f"  warning: {w}")
    steps = ", ".join(f"{s['name']} {s['seconds']:.1f}s" for s in report.get("steps", []))
    lines.append(f"  {report.get('seconds_total', 0):.1f} s: {steps} (opening the run: "
                 f"{report.get('run_open_seconds', 0):.1f} s, once per batch)")  # fmt: skip
    return lines


def table_row(scan: str, report: dict | None, error: str | None = None, seconds=0.0) -> dict:
    """One row of the batch table (a failed scan: status failed, its one-line reason)."""
    if report is None:
        return {**{k: "" for k in TABLE_COLUMNS}, "scan": scan, "status": "failed",
                "error": error, "seconds": round(seconds, 1)}  # fmt: skip
    largest = report["components"][0] if report["components"] else None
    return {
        "scan": scan,
        "status": "ok",
        "mode": report["mode"],
        "flagged_ml": report["flagged"]["ml"],
        "components": len(report["components"]),
        "largest_ml": "" if largest is None else largest["ml"],
        "largest_centre_mm": ""
        if largest is None
        else " ".join(f"{v:g}" for v in largest["centre_world_mm"]),  # fmt: skip
        "warnings": len(report["out_of_distribution"]["warnings"]),
        "seconds": report["seconds_total"],
        "error": "",
    }


def write_table(path: Path, rows: list[dict]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
