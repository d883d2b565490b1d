"""Flagged fraction of held-out healthy brains (p2l.healthy_fpr), the leak guard of the split
CSVs (p2l.splits.check_no_lesion_case_in_ixi) and evaluation's TensorBoard scalars."""

import numpy as np
import pytest

from p2l import eval_tensorboard, healthy_fpr, results_summary, splits
from p2l.errors import ConfigError


def test_volume_row_counts_brain_voxels_strictly_above_each_threshold():
    score = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 9.0]], np.float32)
    mask = np.array([[0, 1, 1], [1, 1, 0]], np.uint8)  # brain scores 1, 2, 3, 4
    row = healthy_fpr.volume_row("h1", score, mask, {"healthy_q98": 2.0, "validation[MSLUB]": 0.5})
    assert row["brain_voxels"] == 4
    assert row["brain_above[healthy_q98]_voxels"] == 2  # 3 and 4; 2 is not > 2; 9 is outside
    assert row["brain_above[healthy_q98]"] == 0.5
    assert row["brain_above[validation_MSLUB]"] == 1.0


def test_summary_pools_voxels_and_averages_volumes():
    stored = {"healthy_q98": 2.0}
    a = healthy_fpr.volume_row("a", np.array([1.0, 3.0]), np.ones(2), stored)  # 1 of 2
    b = healthy_fpr.volume_row("b", np.array([1.0, 1.0, 1.0, 1.0]), np.ones(4), stored)  # 0 of 4
    out = healthy_fpr.summarise([a, b], stored)
    t = out["thresholds"]["healthy_q98"]
    assert out["volumes"] == 2 and out["brain_voxels"] == 6
    assert t["pooled_fraction"] == pytest.approx(1 / 6)
    assert t["mean"] == pytest.approx(0.25) and t["std"] == pytest.approx(0.25)
    summary = {"name": "x", "fold": 0, "seed": 0, "checkpoint_step": 1, "sets": {},
               "thresholds": {"healthy_q98": {"value": 2.0}},
               "healthy_test": {"split": "ixi_test", **out}}  # fmt: skip
    assert "healthy test (ixi_test, 2 volumes), brain voxels above: healthy_q98 16.67 %" in (
        results_summary.format_summary(summary)
    )


def _row(sid, path):
    return splits.SplitRow(sid, path, path + ".mask", None)


def test_a_lesion_case_among_the_healthy_rows_is_refused(tmp_path):
    ixi = [_row("IXI001-HH-0001", str(tmp_path / "a.nii.gz"))]
    splits.check_no_lesion_case_in_ixi(ixi, {"MSLUB": [_row("patient07", str(tmp_path / "p"))]})
    with pytest.raises(ConfigError, match="MSLUB case IXI001-HH-0001 .* also a healthy IXI row"):
        splits.check_no_lesion_case_in_ixi(ixi, {"MSLUB": [_row("IXI001-HH-0001", "/x")]})
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "a.nii.gz")  # one file under two names
    with pytest.raises(ConfigError, match="patient19"):
        splits.check_no_lesion_case_in_ixi(
            ixi, {"WMH": [_row("patient19", str(tmp_path / "link.nii.gz"))]}
        )


def test_tensorboard_scalars_of_an_evaluation_summary():
    summary = {
        "eval": {"healthy_quantile": 98.0},
        "sets": {
            "MSLUB": {
                "metrics": {
                    "dice[oracle]": {"mean": 0.25},
                    "auroc_brain": {"mean": 0.9},
                    "auprc": {"mean": float("nan")},
                }
            }
        },  # fmt: skip
        "thresholds": {"healthy_q98": {"value": 1.5}, "validation[MSLUB]": {"value": None}},
        "healthy_test": {"thresholds": {"healthy_q98": {"pooled_fraction": 0.03}}},
    }
    assert eval_tensorboard.scalars(summary) == {
        "eval/MSLUB/dice[oracle]": 0.25,
        "eval/MSLUB/auroc_brain": 0.9,
        "eval/threshold/healthy_q98": 1.5,
        "eval/healthy_test_brain_above/healthy_q98": 0.03,
    }
