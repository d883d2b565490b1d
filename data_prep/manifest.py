"""The manifest of a prepared dataset folder: `<folder>/manifest.jsonl`, one row per scan.

A row describes one (subject, modality): its raw source files, every step with its parameters and
wall time, tool versions, the atlas, and for each output file (image, mask, seg) its relative path,
sha256, shape, spacing and affine, plus the brain-mask voxel counts, lesion voxel counts and
intensity percentiles inside the brain. `data_prep.prepare` skips scans whose row matches the
current configuration and whose files still hash the same; `data_prep.validate` checks a folder
against it. Only the parent process of a run writes the file (atomically, whole file).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np

from p2l.atomic_write import write_text_atomic
from p2l.errors import DataError
from p2l.preparation.ants_io import sha256_file

MANIFEST_NAME = "manifest.jsonl"
FORMAT_VERSION = 1
PERCENTILES = (1, 5, 50, 95, 99)
_PACKAGES = ("antspyx", "SimpleITK", "nibabel", "numpy", "scipy", "nilearn")

Key = tuple[str, str]  # (subject_id, modality)


def manifest_path(folder: str | os.PathLike) -> Path:
    """`<folder>/manifest.jsonl`."""
    return Path(folder) / MANIFEST_NAME


def read_manifest(folder: str | os.PathLike) -> dict[Key, dict]:
    """Rows keyed by (subject, modality); {} when the folder has no manifest yet."""
    path = manifest_path(folder)
    if not path.is_file():
        return {}
    rows: dict[Key, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (str(row["subject"]), str(row["modality"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(path, f"line {number} is not a manifest row: {err}") from err
        rows[key] = row
    return rows


def write_manifest(folder: str | os.PathLike, rows: dict[Key, dict]) -> None:
    """Rewrite the manifest (sorted by subject, modality) atomically."""
    path = manifest_path(folder)
    text = "".join(json.dumps(rows[key], sort_keys=True) + "\n" for key in sorted(rows))
    write_text_atomic(path, text)


def file_record(path: Path, folder: Path) -> dict:
    """Relative path, sha256 and header geometry of one written NIfTI file."""
    header = nib.load(path)
    zooms = header.header.get_zooms()[:3]
    return {
        "path": str(path.relative_to(folder)),
        "sha256": sha256_file(path),
        "shape": [int(n) for n in header.shape[:3]],
        "spacing": [round(float(z), 6) for z in zooms],
        "affine": np.round(header.affine, 6).tolist(),
        "dtype": str(header.get_data_dtype()),
        "axcodes": "".join(nib.aff2axcodes(header.affine)),
    }


def intensity_stats(image: np.ndarray, mask: np.ndarray) -> dict:
    """Percentiles, min/max and non-positive fraction of the image inside `mask > 0`."""
    inside = image[mask > 0]
    if inside.size == 0:
        raise ValueError("empty brain mask: no intensity statistics")
    values = np.percentile(inside, PERCENTILES)
    stats = {f"p{p}": round(float(v), 4) for p, v in zip(PERCENTILES, values, strict=True)}
    stats.update(
        min=round(float(inside.min()), 4),
        max=round(float(inside.max()), 4),
        nonpositive_fraction=round(float(np.mean(inside <= 0)), 6),
        finite=bool(np.all(np.isfinite(image))),
    )
    return stats


def mask_stats(mask: np.ndarray) -> dict:
    """Brain-mask voxel counts: > 0 (loader's mask), == 1 (training rejection rule, spec §3.2)."""
    return {
        "voxels_gt0": int(np.count_nonzero(mask > 0)),
        "voxels_eq1": int(np.count_nonzero(mask == 1)),
        "voxels_ge05": int(np.count_nonzero(mask >= 0.5)),
    }


def _git_sha() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def tool_versions(extra: dict | None = None) -> dict:
    """Python, package and code versions for the manifest and the run log."""
    versions = {"python": platform.python_version(), "platform": sys.platform}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["p2l_git"] = _git_sha()
    versions.update(extra or {})
    return versions


def config_key(payload: dict) -> str:
    """Stable short hash of everything that decides a scan's outputs (restart decisions)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def verify_outputs(folder: Path, row: dict) -> list[str]:
    """Problems with a row's output files: missing, or content differs from the recorded sha256."""
    problems = []
    for kind, record in sorted(row.get("outputs", {}).items()):
        path = folder / record["path"]
        if not path.is_file():
            problems.append(f"{kind} file missing: {path}")
        elif sha256_file(path) != record["sha256"]:
            problems.append(f"{kind} file changed since it was written (sha256 differs): {path}")
    return problems
