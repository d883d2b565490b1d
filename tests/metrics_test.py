"""Tests of p2l.metrics against hand-computed cases, scikit-learn and a brute-force Hausdorff."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from p2l import metrics, postprocess, results_summary, thresholds
from p2l.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / "shared"
MSLUB = SHARED / "data/mslub_open_ms_data/cross_sectional/MNI/patient19"


def test_overlap_metrics_hand_computed():
    pred = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    gt = np.array([0, 1, 1, 1, 0, 0, 0, 0], bool)
    # TP 2, FP 1, FN 1, TN 4.
    assert metrics.confusion(pred, gt) == (2, 1, 4, 1)
    assert metrics.dice(pred, gt) == pytest.approx(4 / 6)
    assert metrics.precision(pred, gt) == pytest.approx(2 / 3)
    assert metrics.recall(pred, gt) == pytest.approx(2 / 3)
    assert metrics.specificity(pred, gt) == pytest.approx(4 / 5)
    assert metrics.fpr(pred, gt) == pytest.approx(1 / 5)  # not the reference's FDR 1/3


def test_overlap_metrics_undefined_cases_are_nan():
    empty = np.zeros(5, bool)
    assert math.isnan(metrics.dice(empty, empty))
    assert metrics.dice(np.ones(5, bool), empty) == 0.0
    assert math.isnan(metrics.precision(empty, np.ones(5, bool)))
    assert math.isnan(metrics.recall(np.ones(5, bool), empty))
    assert math.isnan(metrics.specificity(np.ones(5), np.ones(5)))
    with pytest.raises(DataError, match=r"^sub-01: prediction shape"):
        metrics.dice(np.ones(3), np.ones(4), name="sub-01")


def test_overlap_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = rng.random(500) < 0.2
        pred = rng.random(500) < 0.3
        tn, fp, fn, tp = confusion_matrix(gt, pred, labels=[0, 1]).ravel()
        assert metrics.confusion(pred, gt) == (tp, fp, tn, fn)
        p, r, _, _ = precision_recall_fscore_support(gt, pred, labels=[0, 1], zero_division=0)
        assert metrics.precision(pred, gt) == pytest.approx(p[1], abs=1e-12)
        assert metrics.recall(pred, gt) == pytest.approx(r[1], abs=1e-12)
        assert metrics.specificity(pred, gt) == pytest.approx(r[0], abs=1e-12)
        assert metrics.fpr(pred, gt) == pytest.approx(fp / (fp + tn), abs=1e-12)


def test_ranking_metrics_hand_computed():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    # Pairs (pos, neg): 0.35 beats 0.1 only; 0.8 beats both -> 3/4. AP: 1/2 * 1 + 1/2 * 2/3.
    assert metrics.auroc(scores, labels) == pytest.approx(0.75)
    assert metrics.auprc(scores, labels) == pytest.approx(5 / 6)
    tied = np.array([1.0, 1.0, 0.0])  # a positive tied with a negative counts 1/2
    assert metrics.auroc(tied, np.array([1, 0, 0])) == pytest.approx(0.75)
    assert math.isnan(metrics.auroc(scores, np.zeros(4)))
    assert math.isnan(metrics.auprc(scores, np.ones(4)))


def test_ranking_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for trial in range(6):
        n = 4000
        labels = rng.random(n) < 0.05 + 0.1 * trial
        # Integer scores: heavy ties, between classes too; a constant background block.
        scores = rng.integers(0, 15, n).astype(np.float32) + 3 * labels
        scores[: n // 3] = 0.0
        assert metrics.auroc(scores, labels) == pytest.approx(
            roc_auc_score(labels, scores), abs=1e-9
        )
        assert metrics.auprc(scores, labels) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-9
        )


def test_ranking_metrics_reject_non_finite_scores():
    with pytest.raises(DataError, match="non-finite"):
        metrics.auroc(np.array([0.0, np.nan]), np.array([0, 1]))


def _brute_force_hausdorff(pred, gt, percentile, spacing):
    """Surface voxels by explicit 6-neighbour checks and all pairwise distances."""

    def surface(mask):
        padded = np.pad(mask, 1)
        interior = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for shift in (-1, 1):
                interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~interior) * np.asarray(spacing)

    a, b = surface(pred), surface(gt)
    d = cdist(a, b)

    def directed(values):
        return values.max() if percentile is None else np.percentile(values, percentile)

    return max(directed(d.min(axis=1)), directed(d.min(axis=0)))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hausdorff_of_offset_cubes_is_the_offset(k):
    a = np.zeros((30, 30, 30), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, k, axis=0)
    assert metrics.hausdorff(a, b) == pytest.approx(k)
    assert metrics.hausdorff(b, a) == pytest.approx(k)
    assert metrics.hausdorff(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2 * k)
    assert metrics.hausdorff(a, b, percentile=95) <= k
    assert metrics.hausdorff(a, a) == 0.0


def _random_boxes(rng, shape, n):
    """Union of random boxes: concave edges, where 6- and 26-neighbour surfaces differ."""
    mask = np.zeros(shape, bool)
    for _ in range(n):
        start = [rng.integers(0, s - 3) for s in shape]
        stop = [b + rng.integers(3, 7) for b in start]
        mask[tuple(slice(b, e) for b, e in zip(start, stop, strict=True))] = True
    return mask


@pytest.mark.parametrize("percentile", [None, 95, 50])
def test_hausdorff_matches_brute_force_on_random_shapes(percentile):
    rng = np.random.default_rng(2)
    for _ in range(4):
        pred = _random_boxes(rng, (16, 15, 14), 4) | (rng.random((16, 15, 14)) < 0.02)
        gt = _random_boxes(rng, (16, 15, 14), 3)
        spacing = (1.0, 1.5, 0.8)
        assert metrics.hausdorff(pred, gt, percentile, spacing) == pytest.approx(
            _brute_force_hausdorff(pred, gt, percentile, spacing), abs=1e-9
        )


def test_hausdorff_empty_masks():
    empty, full = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    full[1:3, 1:3, 1:3] = True
    assert math.isnan(metrics.hausdorff(empty, empty))
    assert metrics.hausdorff(full, empty) == math.inf
    assert metrics.hausdorff(empty, full, percentile=95) == math.inf
    with pytest.raises(ConfigError, match="hausdorff_percentile"):
        metrics.hausdorff(full, full, percentile=0)
    with pytest.raises(ConfigError, match="spacing"):
        metrics.hausdorff(full, full, spacing=(1.0, 1.0))


def test_slice_dice_over_axial_slices():
    gt = np.zeros((4, 4, 3), bool)
    pred = np.zeros((4, 4, 3), bool)
    gt[0:2, 0:2, 0] = True  # axial slice 0: 4 lesion voxels
    pred[0:2, 0:1, 0] = True  # 2 of them predicted -> 2*2/(2+4)
    gt[3, 3, 2] = True  # slice 2: missed
    pred[2, 2, 1] = True  # slice 1 has no lesion: left out
    np.testing.assert_allclose(metrics.slice_dice(pred, gt), [4 / 6, 0.0])
    # Sagittal planes (axis 0, the reference's loop): planes 0, 1 and 3 have lesion.
    np.testing.assert_allclose(metrics.slice_dice(pred, gt, axis=0), [2 / 3, 2 / 3, 0.0])
    with pytest.raises(ConfigError, match="slice_axis"):
        metrics.slice_dice(pred, gt, axis=3)


def test_slice_detection_uses_mean_in_brain_score():
    score = np.zeros((3, 3, 4), np.float32)
    mask = np.zeros((3, 3, 4))
    mask[:2, :2, 0] = 1.0  # slice 0: 4 brain voxels of score 1 -> mean 1 (sum 4)
    score[:2, :2, 0] = 1.0
    mask[1, 1, 1:3] = 0.5  # slices 1, 2: one brain voxel each -> means 5 and 4
    score[1, 1, 1:] = [5.0, 4.0, 9.0]  # slice 3 has no brain: its score is 0, not 9
    score[2, 2, 0] = 100.0  # outside the brain: ignored
    seg = np.zeros((3, 3, 4), bool)
    seg[1, 1, 1:3] = True  # slices 1 and 2 are abnormal, and score highest among brain slices
    assert metrics.slice_detection(score, seg, mask) == (1.0, 1.0)
    seg_low = np.zeros_like(seg)
    seg_low[1, 1, 0] = True  # the slice with the lowest score: slices 1, 2 (5, 4) and 3 (0) rank
    auroc, auprc = metrics.slice_detection(score, seg_low, mask)
    assert auroc == pytest.approx(1 / 3) and auprc == pytest.approx(1 / 3)


def _volume(rng):
    shape = (24, 22, 12)
    mask = np.zeros(shape, np.float32)
    mask[2:22, 2:20, :] = 1.0
    seg = np.zeros(shape, np.uint8)
    seg[8:14, 6:12, 3:8] = 2  # label value 2: binarised with > 0
    score = (rng.normal(0.0, 1.0, shape) + 2.5 * (seg > 0)).astype(np.float32) * mask
    return score, seg, mask


def test_volume_metrics_is_consistent_with_the_single_metrics():
    score, seg, mask = _volume(np.random.default_rng(3))
    row = metrics.volume_metrics(score, seg, mask, {"validation": 1.2, "healthy_q98": 2.0})
    gt = seg > 0
    assert row["auroc"] == pytest.approx(roc_auc_score(gt.ravel(), score.ravel()), abs=1e-9)
    assert row["auprc"] == pytest.approx(
        average_precision_score(gt.ravel(), score.ravel()), abs=1e-9
    )
    assert row["lesion_voxels"] == gt.sum() and row["lesion_slices"] == 5
    best, oracle_t = thresholds.oracle_threshold(score, seg)
    assert row["threshold[oracle]"] == oracle_t and row["dice[oracle]"] == pytest.approx(best)
    for policy, t in [("oracle", oracle_t), ("validation", 1.2), ("healthy_q98", 2.0)]:
        pred = thresholds.predict(score, t)
        tn, fp, fn, tp = confusion_matrix(gt.ravel(), pred.ravel(), labels=[0, 1]).ravel()
        assert row[f"dice[{policy}]"] == pytest.approx(metrics.dice(pred, gt))
        assert row[f"specificity[{policy}]"] == pytest.approx(tn / (tn + fp))
        assert row[f"fpr[{policy}]"] == pytest.approx(fp / (fp + tn))
        assert (row[f"tp[{policy}]"], row[f"fn[{policy}]"]) == (tp, fn)
        assert row[f"hd[{policy}]"] == pytest.approx(metrics.hausdorff(pred, gt))
        assert row[f"hd95[{policy}]"] == pytest.approx(metrics.hausdorff(pred, gt, 95))
        assert row[f"slice_dice[{policy}]"] == pytest.approx(metrics.slice_dice(pred, gt).mean())
    assert all(isinstance(v, float) for v in row.values())


def test_volume_metrics_options():
    score, seg, mask = _volume(np.random.default_rng(4))
    plain = metrics.volume_metrics(score, seg, mask, {"validation": 1.5}, oracle=False)
    assert "dice[oracle]" not in plain and "hd[validation]" in plain
    cleaned = metrics.volume_metrics(
        score, seg, mask, {"validation": 1.5}, oracle=False, min_component_voxels=7
    )
    assert cleaned["fp[validation]"] < plain["fp[validation]"]  # isolated noise voxels removed
    quick = metrics.volume_metrics(score, seg, mask, {}, hausdorff_distances=False)
    assert "hd[oracle]" not in quick and "dice[oracle]" in quick
    with pytest.raises(ConfigError, match="oracle"):
        metrics.volume_metrics(score, seg, mask, {"oracle": 1.0})
    with pytest.raises(ConfigError, match="thresholds.validation"):
        metrics.volume_metrics(score, seg, mask, {"validation": float("nan")})
    with pytest.raises(DataError, match=r"^BraTS-1: mask shape"):
        metrics.volume_metrics(score, seg, mask[:-1], {}, name="BraTS-1")


def test_aggregate_nan_and_inf():
    rows = [
        {"id": "a", "dice": 1.0, "hd": math.inf},
        {"id": "b", "dice": 3.0, "hd": 2.0},
        {"id": "c", "dice": math.nan},
    ]
    summary = results_summary.aggregate(rows)
    assert "id" not in summary
    assert summary["dice"] == {"mean": 2.0, "std": 1.0, "n": 2.0, "n_nan": 1.0, "n_inf": 0.0}
    assert summary["hd"] == {"mean": 2.0, "std": 0.0, "n": 1.0, "n_nan": 1.0, "n_inf": 1.0}
    assert math.isnan(results_summary.aggregate([{"x": math.nan}])["x"]["mean"])


def _centre_crop_or_pad(volume: np.ndarray, shape=(192, 192, 100)) -> np.ndarray:
    """Centred crop/zero-pad to the evaluation grid, as torchio's CropOrPad (spec §2.2)."""
    out = np.zeros(shape, volume.dtype)
    source, target = [], []
    for n, t in zip(volume.shape, shape, strict=True):
        if n >= t:
            source.append(slice((n - t) // 2, (n - t) // 2 + t))
            target.append(slice(0, t))
        else:
            source.append(slice(0, n))
            target.append(slice((t - n) // 2, (t - n) // 2 + n))
    out[tuple(target)] = volume[tuple(source)]
    return out


def test_real_mslub_case_end_to_end():
    """MSLUB patient19 (expert consensus mask), FLAIR intensity standing in for the score."""
    nib = pytest.importorskip("nibabel")
    if not MSLUB.is_dir():
        pytest.skip(f"real data not found at {MSLUB}")
    flair = np.asanyarray(
        nib.load(
            MSLUB / "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
        ).dataobj,
        dtype=np.float32,
    )
    seg = np.asanyarray(
        nib.load(
            MSLUB / "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"
        ).dataobj
    )
    flair, seg = _centre_crop_or_pad(flair), _centre_crop_or_pad(seg)
    mask = (flair > 0).astype(np.float32)
    low, high = np.percentile(flair[mask > 0], [1, 99])
    score = postprocess.postprocess(np.clip((flair - low) / (high - low), 0, 1), mask)
    q98 = thresholds.healthy_quantile_threshold([score[mask > 0]])
    row = metrics.volume_metrics(score, seg, mask, {"healthy_q98": q98})

    gt = seg > 0
    assert row["lesion_voxels"] == gt.sum() > 40_000
    # Exact on 3.7 M voxels with a tied background of zeros.
    assert row["auroc"] == pytest.approx(roc_auc_score(gt.ravel(), score.ravel()), abs=1e-9)
    # MS lesions are FLAIR-hyperintense: intensity alone ranks them high.
    assert row["auroc"] > 0.95 and row["slice_auroc"] > 0.8
    assert row["dice[oracle]"] > 0.5 and row["dice[healthy_q98]"] > 0.4
    assert 0 < row["hd95[oracle]"] <= row["hd[oracle]"] < 100
    # The exhaustive validation search, tuned on this volume, can only beat the reference's
    # 20-point bisection.
    t = thresholds.validation_threshold([score], [seg], [mask])
    assert metrics.dice(thresholds.predict(score, t), gt) >= row["dice[oracle]"]
