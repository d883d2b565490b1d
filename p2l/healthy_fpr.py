"""False positives on held-out healthy brains: the fraction of each healthy test volume's brain
voxels above every stored threshold (healthy quantile, validation-tuned per lesion set).

The healthy-quantile threshold is taken on `eval.healthy_split` (the IXI validation fold); scoring
other healthy subjects (`eval.healthy_test_split`, e.g. "ixi_test") at it says how much of a
healthy brain the method flags — about 2 % by construction on the subjects the quantile came from
(q98), and an honest figure only on subjects it did not see. Every volume is a healthy scan, so
each flagged voxel is a false positive: the fraction is the voxel-wise false-positive rate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from p2l.results_summary import aggregate


def column(threshold_name: str) -> str:
    """CSV/summary key of one threshold: `validation[MSLUB]` -> `brain_above[validation_MSLUB]`."""
    return "brain_above[" + re.sub(r"\[(.*)\]$", r"_\1", threshold_name) + "]"


def volume_row(subject_id: str, score: np.ndarray, mask: np.ndarray,
               stored: Mapping[str, float]) -> dict:  # fmt: skip
    """One healthy volume: its brain voxel count and, per threshold, the fraction of its brain
    voxels with score > threshold (the prediction rule of p2l.thresholds.predict)."""
    brain = score[mask > 0]
    row: dict = {"subject_id": subject_id, "brain_voxels": int(brain.size)}
    for name, value in stored.items():
        above = int(np.count_nonzero(brain > value))
        row[f"{column(name)}_voxels"] = above
        row[column(name)] = above / brain.size if brain.size else float("nan")
    return row


def summarise(rows: list[dict], stored: Mapping[str, float]) -> dict:
    """Per threshold: its value, the pooled fraction (flagged / brain voxels over all volumes) and
    the mean ± std over volumes."""
    per_volume = aggregate(rows)
    brain = sum(r["brain_voxels"] for r in rows)
    out = {"volumes": len(rows), "brain_voxels": brain, "thresholds": {}}
    for name, value in stored.items():
        key = column(name)
        flagged = sum(r[f"{key}_voxels"] for r in rows)
        out["thresholds"][name] = {
            "value": value,
            "pooled_fraction": flagged / brain if brain else None,
            "mean": per_volume.get(key, {}).get("mean"),
            "std": per_volume.get(key, {}).get("std"),
        }
    return out
