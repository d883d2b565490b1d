"""What preparation a run's training data had, so a raw scan can be given the same (issue 14).

`data_prep` writes one manifest row per prepared scan (`<dataset folder>/manifest.jsonl`) with the
settings of spec §2.1's five steps. A run keeps the settings of its training data in
`training_space.json` ("preparation", written at the first start, p2l.orientation); a run from
before that record is read from its training data's manifest instead. Plain JSON: no ANTs here,
so training can write it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from p2l.errors import DataError

MANIFEST_NAME = "manifest.jsonl"  # data_prep.manifest.MANIFEST_NAME
# The keys of a manifest row's "config" that decide how a scan is prepared (data_prep.PrepConfig).
_SETTINGS = ("skull_strip", "hd_bet_args", "registration", "n4", "crop_mode")


def from_manifest(image_path: str | os.PathLike) -> dict | None:
    """The preparation of the scan at `image_path` (data_prep layout: `<folder>/<modality>/file`,
    the manifest in `<folder>`), or None when no manifest lists it (data not made by data_prep,
    e.g. the embedded demo)."""
    image_path = Path(image_path)
    manifest = image_path.parent.parent / MANIFEST_NAME
    if not manifest.is_file():
        return None
    wanted = f"{image_path.parent.name}/{image_path.name}"
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            path = row["outputs"]["image"]["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(
                manifest, f"line {number} is not a data_prep manifest row: {err}"
            ) from None
        if path == wanted:
            return _record(row, manifest)
    return None


def _record(row: dict, manifest: Path) -> dict:
    try:
        config, atlas = row["config"], row["atlas"]
        record = {key: config[key] for key in _SETTINGS}
        record.update(
            pipeline=str(row["pipeline"]),
            spacing_mm=float(row.get("spacing_mm", config.get("spacing", 1.0))),
            # The method the scan actually had (auto resolves per dataset).
            skull_strip_used=str(row["skull_strip"]["method"]),
            atlas={
                "path": config.get("atlas_path"),  # None: nilearn's bundled MNI152
                "sha256": atlas["sha256"],
                "name": atlas["name"],
            },
            manifest=str(manifest),
            subject=str(row["subject"]),
            modality=str(row["modality"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(manifest, f"manifest row lacks the preparation settings ({err})") from None
    return record


def for_run(workdir: str | os.PathLike, space: dict | None, training_image: str | None) -> dict:
    """The run's preparation record: from `training_space.json`, else from the manifest of its
    first training scan. DataError when neither exists (raw scans cannot be prepared the same)."""
    if space is not None and space.get("preparation"):
        return space["preparation"]
    record = from_manifest(training_image) if training_image else None
    if record is None:
        raise DataError(
            workdir,
            "the run's training data were not prepared by data_prep (no manifest.jsonl lists "
            f"{training_image}), so a raw scan cannot be given the same preparation: prepare "
            "it like the training data and pass --prepared",
        )
    return record
