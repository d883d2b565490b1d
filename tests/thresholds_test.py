"""Tests of p2l.thresholds: oracle bisection, healthy quantile, validation-tuned threshold."""

from __future__ import annotations

import numpy as np
import pytest

from p2l import thresholds
from p2l.errors import ConfigError, DataError


def _recursive_bisection(x, y, low, high, steps, step=0, best=0, point=0):
    """Independent recursive restatement of the reference's `find_best_val` (spec §5.6)."""
    if step == steps:
        return best, point
    if low == high:
        high = 1
    quarter, three_quarters = low + (high - low) * 0.25, low + (high - low) * 0.75
    middle = low + (high - low) * 0.5

    def dice(q):
        p = x > np.float32(q)
        total = p.sum() + y.sum()
        return np.nan if total == 0 else 2 * (p & y).sum() / total

    d_low, d_high = dice(quarter), dice(three_quarters)
    if d_low >= d_high:
        if d_low >= best:
            best, point = d_low, quarter
        return _recursive_bisection(x, y, low, middle, steps, step + 1, best, point)
    if d_high >= best:
        best, point = d_high, three_quarters
    return _recursive_bisection(x, y, middle, high, steps, step + 1, best, point)


def test_policy_names():
    assert [p.name for p in thresholds.policies()] == ["oracle", "validation", "healthy_q98"]
    # The healthy policy is named from its quantile: eval.healthy_quantile=95 is "healthy_q95".
    assert [p.name for p in thresholds.policies(95.0)][-1] == "healthy_q95"
    assert thresholds.healthy_policy_name(97.5) == "healthy_q97.5"
    assert [p.per_volume for p in thresholds.policies()] == [True, False, False]


def test_predict_is_strict_and_compares_in_the_score_dtype():
    score = np.array([0.1, 0.2, 0.3], np.float32)
    np.testing.assert_array_equal(thresholds.predict(score, 0.2), [False, False, True])
    # float32(0.1) > 0.1 in float64, but not once 0.1 is rounded to float32 as NumPy 1.x did.
    assert not thresholds.predict(score, np.float64(0.1))[0]
    np.testing.assert_array_equal(thresholds.predict(np.array([1, 2, 3]), 1.5), [False, True, True])


def test_oracle_hand_traced_bisection():
    score = np.array([0.0, 0.2, 0.6, 0.9, 1.0], np.float32)
    seg = np.array([0, 0, 1, 1, 1])
    # Step 0, (0, 1):        q=0.25 -> Dice 6/6 = 1;  q=0.75 -> 4/5.    Best (1, 0.25), go low.
    # Step 1, (0, 0.5):      q=0.125 -> 6/7;         q=0.375 -> 1.      Best (1, 0.375), go high.
    # Step 2, (0.25, 0.5):   q=0.3125 -> 1;          q=0.4375 -> 1.     Ties: low half, and the
    #                        equal later value replaces the best: (1, 0.3125).
    assert thresholds.oracle_threshold(score, seg, max_steps=1) == (1.0, 0.25)
    assert thresholds.oracle_threshold(score, seg, max_steps=2) == (1.0, 0.375)
    assert thresholds.oracle_threshold(score, seg, max_steps=3) == (1.0, 0.3125)


def test_oracle_matches_recursive_reference_on_random_volumes():
    rng = np.random.default_rng(0)
    for trial in range(5):
        seg = np.zeros((20, 20, 10), bool)
        seg[5:12, 6:14, 2 + trial : 7] = True
        score = rng.normal(0.0, 1.0, seg.shape).astype(np.float32) + 1.5 * seg
        best, point = thresholds.oracle_threshold(score, seg)
        expected = _recursive_bisection(score.ravel(), seg.ravel(), 0, float(score.max()), 10)
        assert (best, point) == (float(expected[0]), float(expected[1]))


def test_oracle_quirks():
    seg = np.zeros(6, bool)
    seg[:2] = True
    # max(score) == 0: the interval becomes (0, 1); nothing is predicted, every Dice is 0, ties
    # take the lower half and the `>=` update keeps the last lower point: 0.25, then 0.125.
    assert thresholds.oracle_threshold(np.zeros(6, np.float32), seg, max_steps=2) == (0.0, 0.125)
    # No lesion and no prediction: Dice is NaN, nothing is ever recorded.
    assert thresholds.oracle_threshold(np.zeros(6, np.float32), np.zeros(6), max_steps=3) == (
        0.0,
        0.0,
    )
    # Negative maximum: the interval (0, max) is reversed and the points are negative.
    negative = np.array([-3.0, -2.0, -1.0, -0.5, -4.0, -5.0], np.float32)
    best, point = thresholds.oracle_threshold(negative, seg, max_steps=1)
    assert (best, point) == (0.0, -0.125)
    assert thresholds.oracle_threshold(negative, seg, max_steps=0) == (0.0, 0.0)


def test_oracle_rejects_bad_input():
    with pytest.raises(DataError, match=r"^v1: seg shape"):
        thresholds.oracle_threshold(np.zeros((3, 3)), np.zeros((3, 2)), name="v1")
    with pytest.raises(DataError, match="non-finite"):
        thresholds.oracle_threshold(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ConfigError, match="oracle_steps"):
        thresholds.oracle_threshold(np.zeros(3), np.zeros(3), max_steps=-1)


def test_healthy_quantile_pools_volumes():
    healthy = [np.arange(100, dtype=np.float32), np.arange(100, 200, dtype=np.float32)]
    # Linear interpolation at position 0.98 * 199 = 195.02 of the pooled, sorted values 0..199.
    assert thresholds.healthy_quantile_threshold(healthy) == pytest.approx(195.02)
    assert thresholds.healthy_quantile_threshold(healthy, q=50) == pytest.approx(99.5)
    assert thresholds.healthy_quantile_threshold([np.zeros(0), np.ones(4)]) == 1.0
    with pytest.raises(DataError):
        thresholds.healthy_quantile_threshold([])
    with pytest.raises(DataError, match="non-finite"):
        thresholds.healthy_quantile_threshold([np.array([1.0, np.inf])])
    with pytest.raises(ConfigError):
        thresholds.healthy_quantile_threshold(healthy, q=101)


def _objective(scores, segs, threshold, objective):
    tp = [
        np.count_nonzero(thresholds.predict(s, threshold) & (g > 0)) for s, g in zip(scores, segs)
    ]
    pred = [np.count_nonzero(thresholds.predict(s, threshold)) for s in scores]
    truth = [np.count_nonzero(g) for g in segs]
    if objective == "pooled":
        return 2 * sum(tp) / (sum(pred) + sum(truth))
    dices = [2 * a / (b + c) for a, b, c in zip(tp, pred, truth) if b + c > 0]
    return float(np.mean(dices))


def _brute_force_best(scores, segs, objective):
    candidates = np.unique(np.concatenate([s.ravel() for s in scores])).astype(np.float64)
    smallest = np.nextafter(np.float32(candidates[0]), np.float32(-np.inf))
    values = [_objective(scores, segs, t, objective) for t in [smallest, *candidates]]
    return max(values)


@pytest.mark.parametrize("objective", ["pooled", "mean"])
@pytest.mark.parametrize("n_bins", [2, 7, 65536])
def test_validation_threshold_reaches_the_brute_force_optimum(objective, n_bins):
    rng = np.random.default_rng(n_bins)
    scores, segs, masks = [], [], []
    for i in range(4):
        seg = np.zeros((10, 9, 8), bool)
        seg[2 : 5 + i, 3:6, 1:5] = True
        mask = np.zeros(seg.shape, bool)
        mask[1:9, 1:8, :] = True
        # Rounded scores: ties inside the volumes; background exactly 0 as after post-processing.
        score = np.round(rng.normal(0.0, 1.0, seg.shape) + 1.2 * seg, 1).astype(np.float32) * mask
        scores.append(score)
        segs.append(seg.astype(np.uint8))
        masks.append(mask.astype(np.float32))
    t = thresholds.validation_threshold(scores, segs, masks, objective=objective, n_bins=n_bins)
    assert _objective(scores, segs, t, objective) == pytest.approx(
        _brute_force_best(scores, segs, objective), abs=1e-12
    )


def test_validation_threshold_hand_case_and_objectives_differ():
    # Volume A: lesion scores 2, 3; volume B: one lesion voxel at 2.5 and healthy voxels at 2.6.
    scores = [
        np.array([0.0, 1.0, 2.0, 3.0], np.float32),
        np.array([2.6, 2.6, 2.5, 0.0], np.float32),
    ]
    segs = [np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0])]
    # Pooled: t = 2.5 predicts {3, 2.6, 2.6} -> 2*1/(3+3); t = 1 predicts {2, 3, 2.6, 2.6, 2.5}
    # -> 2*3/(5+3) = 0.75, the best. Mean: t = 1 -> (1 + 2/4)/2 = 0.75; t = 2.6 -> (2/3 + 0)/2.
    assert thresholds.validation_threshold(scores, segs) == 1.0
    assert thresholds.validation_threshold(scores, segs, objective="mean") == 1.0
    # Everything predicted is best when every voxel is lesion.
    t = thresholds.validation_threshold([np.array([1.0, 2.0], np.float32)], [np.ones(2)])
    assert t < 1.0 and thresholds.predict(np.array([1.0], np.float32), t).all()


def test_validation_threshold_rejects_bad_input():
    with pytest.raises(DataError, match="no lesion"):
        thresholds.validation_threshold([np.ones(3)], [np.zeros(3)])
    with pytest.raises(DataError, match="validation volume #1: seg shape"):
        thresholds.validation_threshold([np.ones(3), np.ones(3)], [np.ones(3), np.ones(2)])
    with pytest.raises(DataError, match="2 scores, 1 segmentations"):
        thresholds.validation_threshold([np.ones(3), np.ones(3)], [np.ones(3)])
    with pytest.raises(ConfigError, match="validation_objective"):
        thresholds.validation_threshold([np.ones(3)], [np.ones(3)], objective="median")
