"""Tests of p2l.score_histograms: the streaming thresholds against the exact ones of
p2l.thresholds, within the tolerances stated in the module docstring."""

from __future__ import annotations

import numpy as np
import pytest

from p2l import score_histograms as sh
from p2l import thresholds
from p2l.errors import DataError


def _volumes(n=5, seed=0, shape=(40, 36, 24), base=-4.0):
    """Post-processed-like score volumes: negative log-scores in the brain, higher in lesions,
    exactly 0 outside the brain (spec §5.3, §5.5), smooth-ish and with many ties."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    scores, segs, masks = [], [], []
    for i in range(n):
        centre = rng.uniform(-0.4, 0.4, 3)[:, None, None, None]
        seg = (((grid - centre) ** 2).sum(0) < (0.05 + 0.03 * i)) & brain
        if i == 0:
            seg[:] = False  # a volume without lesion
        raw = rng.normal(base, 1.2, shape) + 3.0 * seg + 0.8 * rng.standard_normal() * grid[0]
        raw = np.round(raw, 3)  # ties, as a median filter produces
        scores.append((raw * brain).astype(np.float32))
        segs.append(seg.astype(np.uint8))
        masks.append(brain.astype(np.float32))
    return scores, segs, masks


def _pooled_dice(scores, segs, t):
    tp = sum(np.count_nonzero(thresholds.predict(s, t) & (g > 0)) for s, g in zip(scores, segs))
    pred = sum(np.count_nonzero(thresholds.predict(s, t)) for s in scores)
    return 2 * tp / (pred + sum(np.count_nonzero(g) for g in segs))


def test_bins_are_ordered_intervals_covering_every_float():
    values = np.array([-3e38, -5.0, -1e-30, -0.0, 0.0, 1e-40, 1e-7, 2.5, 3e38], np.float32)
    index = sh.bin_index(values)
    assert np.all(np.diff(index) >= 0) and index[3] == index[4]  # -0.0 and 0.0 share a bin
    low, high = sh.bin_bounds(index)
    assert np.all(low <= values) and np.all(values <= high)
    # Relative width 2**-11 away from zero; the bin of zero is tiny.
    assert sh.bin_width(2.5) == pytest.approx(2.0 * 2**-11, rel=1e-3)
    assert sh.bin_width(0.0) < 1e-40


@pytest.mark.parametrize("q", [50.0, 90.0, 98.0, 99.9])
def test_quantile_matches_numpy_percentile_within_tolerance(q):
    scores, _, masks = _volumes()
    inside = [s[m > 0] for s, m in zip(scores, masks)]
    hist = sh.Histogram()
    for values in inside:
        hist.add(sh.volume_counts(values))
    exact = thresholds.healthy_quantile_threshold(inside, q=q)
    ordered = np.sort(np.concatenate(inside)).astype(np.float64)
    position = (ordered.size - 1) * q / 100
    neighbours = ordered[int(np.floor(position)) : int(np.floor(position)) + 2]
    tolerance = 2**-11 * np.abs(neighbours).max()
    assert abs(sh.quantile(hist.counts, q) - exact) <= tolerance


def test_quantile_of_ties_and_small_sets_is_exact_enough():
    counts = sh.volume_counts(np.array([0.0, 0.0, 0.0, 1.0], np.float32))
    assert sh.quantile(counts, 50) == pytest.approx(0.0, abs=1e-40)
    assert sh.quantile(counts, 100) == pytest.approx(1.0, rel=2**-11)
    with pytest.raises(DataError, match="non-finite"):
        sh.volume_counts(np.array([1.0, np.nan]))
    with pytest.raises(DataError, match="empty brain"):
        sh.quantile(np.zeros(sh.N_BINS, np.int64), 98)


@pytest.mark.parametrize("seed, base", [(0, -4.0), (1, -6.5), (2, 1.0), (3, 2.5)])
def test_validation_threshold_matches_the_exact_search_within_tolerance(seed, base):
    # base < 0: log-scores below the background's 0 (spec §8.16); base > 0: above it.
    scores, segs, masks = _volumes(seed=seed, base=base)
    parts = [sh.Histogram(columns=2), sh.Histogram(columns=2)]
    for i, (s, g) in enumerate(zip(scores, segs)):
        parts[i % 2].add(sh.volume_counts_with_lesion(s, g))  # two "processes"
    merged = sh.Histogram.merged([p.sparse() for p in parts])
    assert merged.volumes == len(scores)
    t_hist = sh.best_dice_threshold(merged.counts)
    t_exact = thresholds.validation_threshold(scores, segs, masks)
    assert abs(t_hist - t_exact) <= 2 * sh.bin_width(t_exact)
    assert _pooled_dice(scores, segs, t_hist) >= _pooled_dice(scores, segs, t_exact) - 1e-3


def test_validation_threshold_predicting_everything():
    scores = [np.array([1.0, 2.0], np.float32)]
    t = sh.best_dice_threshold(sh.volume_counts_with_lesion(scores[0], np.ones(2)))
    assert thresholds.predict(scores[0], t).all() and t > 1.0 - 2 * sh.bin_width(1.0)
    with pytest.raises(DataError, match="no lesion"):
        sh.best_dice_threshold(sh.volume_counts_with_lesion(scores[0], np.zeros(2)))
