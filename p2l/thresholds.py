"""Thresholds that turn a lesion map into a binary prediction (spec §5.6, §7, §8.14, §8.17).

Three policies, and every reported Dice carries the name of the one that produced it (spec §7);
`policies()` is the one table of them that evaluation, tables and detection loop over:

- "oracle": per volume, the reference's Zimmerer bisection against that volume's own ground truth
  ("Supervised" in the reference code): an upper bound, not comparable to pDDPM/cDDPM numbers.
- "validation": one threshold for a whole test set, tuned once on a lesion validation split to
  maximise the Dice of the pooled voxels (pDDPM/cDDPM protocol, spec §7).
- "healthy_q<q>" (q = `eval.healthy_quantile`, 98 in the reference: "healthy_q98"): the q-th
  percentile of in-brain scores of healthy volumes ("Unsupervised" in the reference, whose code
  path is commented out, spec §5.6).

The prediction rule is always `score > threshold` (strict), see `predict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from p2l.errors import ConfigError, DataError

# Spec §5.6: `unsupervised_quantile: 98`.
HEALTHY_QUANTILE = 98.0
# Spec §5.6: `find_best_val(..., max_steps=10)`.
ORACLE_STEPS = 10


ORACLE = "oracle"
VALIDATION = "validation"


@dataclass(frozen=True)
class Policy:
    """A threshold policy: `name` keys its metrics (`dice[<name>]`), `label` heads table columns."""

    name: str
    label: str
    meaning: str  # one line for the legend under tables
    per_volume: bool = False  # True: needs the volume's own ground truth (no stored value)


def healthy_policy_name(q: float = HEALTHY_QUANTILE) -> str:
    return f"healthy_q{q:g}"


def policies(healthy_quantile: float = HEALTHY_QUANTILE) -> tuple[Policy, ...]:
    """The threshold policies of a run, in reporting order; the healthy one named from its q."""
    q = float(healthy_quantile)
    return (
        Policy(ORACLE, "oracle", "per-volume best threshold (the reference's 'Supervised Dice', "
               "an upper bound)", per_volume=True),
        Policy(VALIDATION, "val-tuned", "one threshold per dataset from its lesion validation "
               "split, on the test volumes minus the validation subjects (Behrendt protocol)"),
        Policy(healthy_policy_name(q), f"healthy q{q:g}", f"{q:g}th percentile of healthy IXI "
               "in-brain scores"),
    )  # fmt: skip


def _as_score(score: np.ndarray, name: str) -> np.ndarray:
    score = np.asarray(score)
    if score.dtype == bool or not np.issubdtype(score.dtype, np.number):
        raise DataError(name, f"score must be a real numeric array, got dtype {score.dtype}")
    if np.iscomplexobj(score):
        raise DataError(name, f"score must be real, got dtype {score.dtype}")
    if score.size == 0:
        raise DataError(name, "score is empty")
    if not np.isfinite(score).all():
        bad = score.size - int(np.isfinite(score).sum())
        raise DataError(name, f"score has {bad} non-finite value(s)")
    return score


def _as_labels(labels: np.ndarray, score: np.ndarray, what: str, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != score.shape:
        raise DataError(
            name, f"{what} shape {labels.shape} does not match score shape {score.shape}"
        )
    # Spec §2.2: segmentations and masks are label maps binarised with > 0.
    return labels > 0


def predict(score: np.ndarray, threshold: float) -> np.ndarray:
    """Binary prediction `score > threshold` (spec §5.6).

    For floating scores the comparison is done in the score's dtype (the threshold is rounded to
    it), as NumPy 1.x did when the reference compared its float32 heatmap with a float64 scalar;
    NumPy 2 would otherwise compare in float64 when given a NumPy float64 threshold.
    """
    score = np.asarray(score)
    if score.dtype.kind == "f":
        return score > np.asarray(threshold, dtype=score.dtype)
    return score > threshold


def _dice_from_counts(intersection: float, predicted: float, truth: float) -> float:
    # The reference's `dice`: (2 * pgsum) / (psum + gsum), NaN (0/0) when both are empty.
    denominator = predicted + truth
    return float("nan") if denominator == 0 else 2.0 * intersection / denominator


def oracle_threshold(
    score: np.ndarray, seg: np.ndarray, max_steps: int = ORACLE_STEPS, *, name: str = "score"
) -> tuple[float, float]:
    """Per-volume oracle: the reference's `find_best_val` bisection, quirks included (spec §5.6).

    Reproduces `find_best_val(score.flatten(), seg.flatten() > 0, val_range=(0, max(score)),
    max_steps=10, step=0, max_val=0, max_point=0)` from `src/utils/utils_eval.py` of Patch2Loc and
    of FinnBehrendt/patched-Diffusion-Models-UAD (identical in both):

    - each step evaluates Dice of `score > q` at the 25 % and 75 % points of the current interval
      and keeps the half whose point scored at least as well (`>=`: ties go to the lower half);
    - the running best is replaced when a value is `>=` it, so equal later values win, and since it
      starts at (0, 0) a volume where every Dice is 0 returns the last point evaluated;
    - a Dice of NaN (prediction and ground truth both empty) fails every comparison: the search then
      takes the upper half without recording anything;
    - the search covers only (0, max(score)); negative thresholds, which in-brain log-scores may
      need (spec §8.16), are never tried. If max(score) == 0 the interval becomes (0, 1); if
      max(score) < 0 the interval is reversed and the points are negative;
    - the answer is one of the 2 * max_steps evaluated points, not the best threshold overall.

    The points are computed in float64 from the score's maximum and compared in the score's dtype,
    as NumPy 1.x did for the reference. Returns (best Dice, threshold) as Python floats; a volume
    whose every comparison failed returns (0.0, 0.0), as the reference.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer) or max_steps < 0:
        raise ConfigError("oracle_steps", f"must be an integer >= 0, got {max_steps!r}")
    score = _as_score(score, name)
    truth = _as_labels(seg, score, "seg", name).ravel()
    score = score.ravel()
    lesion_scores = score[truth]
    n_truth = lesion_scores.size

    def dice_at(q: float) -> float:
        predicted = predict(score, q)
        return _dice_from_counts(
            int(np.count_nonzero(predict(lesion_scores, q))),
            int(np.count_nonzero(predicted)),
            n_truth,
        )

    best_value, best_point = 0.0, 0.0
    bottom, top = 0.0, float(np.max(score))
    for _ in range(int(max_steps)):
        if bottom == top:
            top = 1.0
        center = bottom + (top - bottom) * 0.5
        q_bottom = bottom + (top - bottom) * 0.25
        q_top = bottom + (top - bottom) * 0.75
        val_bottom, val_top = dice_at(q_bottom), dice_at(q_top)
        if val_bottom >= val_top:
            if val_bottom >= best_value:
                best_value, best_point = val_bottom, q_bottom
            top = center
        else:
            if val_top >= best_value:
                best_value, best_point = val_top, q_top
            bottom = center
    return float(best_value), float(best_point)


def healthy_quantile_threshold(
    scores_in_brain: Sequence[np.ndarray], q: float = HEALTHY_QUANTILE
) -> float:
    """q-th percentile of the pooled in-brain scores of healthy volumes (spec §5.6).

    Pass `score[mask > 0]` of each healthy volume. The reference computed it on *unfiltered* IXI
    heatmaps and applied it to *filtered* test heatmaps (spec §8.14); post-process the healthy
    volumes exactly like the test volumes (the caller decides) so that the threshold is taken on
    the distribution it is applied to. Percentile with NumPy's default linear interpolation (the
    reference's `calculate_quantiles` is not in the public code, [inferred]). All values are
    concatenated, so memory grows with the number of healthy volumes (~6 MB per volume in float32);
    evaluation uses `p2l.score_histograms.quantile` (fixed memory, stated tolerance) and this
    exact function is the reference the tests check it against.
    """
    if not 0 <= q <= 100:
        raise ConfigError("healthy_quantile", f"must be within [0, 100], got {q}")
    if len(scores_in_brain) == 0:
        raise DataError("healthy scores", "no healthy volumes given")
    parts = []
    for i, scores in enumerate(scores_in_brain):
        part = np.asarray(scores).ravel()
        if part.size:
            parts.append(_as_score(part, f"healthy volume #{i}"))
    if not parts:
        raise DataError("healthy scores", "every healthy volume has an empty brain mask")
    return float(np.percentile(np.concatenate(parts), q))


def _bin_index(values: np.ndarray, low: float, scale: float, n_bins: int) -> np.ndarray:
    # Monotone non-decreasing in the value (subtraction, multiplication and floor all round
    # monotonically), so every bin is an interval of values and bins are ordered.
    index = np.floor((values.astype(np.float64) - low) * scale)
    return np.clip(index, 0, n_bins - 1).astype(np.intp)


def _dice_matrix(above: np.ndarray, above_lesion: np.ndarray, truth: np.ndarray) -> np.ndarray:
    denominator = above + truth[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2.0 * above_lesion / denominator, np.nan)


def _objective(dice: np.ndarray) -> np.ndarray:
    # One group (pooled) or one row per volume (mean): the mean over the volumes where Dice is
    # defined; NaN where it is defined for none.
    defined = ~np.isnan(dice)
    total = np.where(defined, dice, 0.0).sum(axis=0)
    count = defined.sum(axis=0)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def validation_threshold(
    scores: Sequence[np.ndarray],
    segs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None = None,
    *,
    objective: str = "pooled",
    n_bins: int = 65536,
) -> float:
    """One threshold for a test set, tuned on a lesion validation split (spec §7, §8.17).

    Pass the post-processed score volumes of the validation split, their segmentations and
    (optionally) brain masks. Returns t maximising, over the prediction `score > t`:

    - objective "pooled" (default, pDDPM/cDDPM's `threshold['total']`): the Dice of all voxels of
      all volumes taken together, i.e. 2 * sum(TP) / (sum(|P|) + sum(|G|));
    - objective "mean": the mean over volumes of the per-volume Dice (volumes where it is undefined,
      no lesion and no prediction, are left out).

    Unlike pDDPM's bisection over (0, max), the search is exhaustive up to binning: every voxel is
    counted in `n_bins` equal-width bins spanning the in-brain scores (all scores when masks is
    None; values outside fall in the end bins), the objective is evaluated exactly at every bin
    edge, and then exactly at every distinct score value in the two bins next to the best edge.
    The result is the exact optimum unless the objective peaks higher strictly inside another
    bin. Every voxel of each volume counts, background included, as in the per-volume Dice. Ties go
    to the smallest candidate. Cost: two passes over the volumes; objective "mean" also holds a
    few (n_volumes, n_bins) count arrays (~50 MB each for 100 volumes). Evaluation, which must not
    hold the volumes, uses `p2l.score_histograms.best_dice_threshold` (pooled; tolerance stated
    there) and this exact search is the reference the tests check it against.
    """
    if objective not in ("pooled", "mean"):
        raise ConfigError("validation_objective", f"must be 'pooled' or 'mean', got {objective!r}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 2:
        raise ConfigError("validation_bins", f"must be an integer >= 2, got {n_bins!r}")
    n_volumes = len(scores)
    if n_volumes == 0:
        raise DataError("validation scores", "no validation volumes given")
    if len(segs) != n_volumes or (masks is not None and len(masks) != n_volumes):
        raise DataError(
            "validation scores",
            f"got {n_volumes} scores, {len(segs)} segmentations and "
            f"{'no' if masks is None else len(masks)} masks",
        )
    volumes, truths = [], []
    low, high = np.inf, -np.inf
    for i in range(n_volumes):
        name = f"validation volume #{i}"
        score = _as_score(scores[i], name)
        truths.append(_as_labels(segs[i], score, "seg", name))
        volumes.append(score)
        in_range = score if masks is None else score[_as_labels(masks[i], score, "mask", name)]
        if in_range.size:
            low, high = min(low, float(in_range.min())), max(high, float(in_range.max()))
    if not np.isfinite(low):  # every mask empty
        low = min(float(v.min()) for v in volumes)
        high = max(float(v.max()) for v in volumes)
    n_truth_total = sum(int(t.sum()) for t in truths)
    if n_truth_total == 0:
        raise DataError("validation segs", "no lesion voxel in any validation volume")
    scale = (n_bins - 1) / (high - low) if high > low else 0.0
    n_groups = 1 if objective == "pooled" else n_volumes
    group_of = [0 if objective == "pooled" else i for i in range(n_volumes)]

    # Pass 1: histograms of all voxels and of lesion voxels per group.
    hist = np.zeros((n_groups, n_bins), dtype=np.int64)
    hist_lesion = np.zeros((n_groups, n_bins), dtype=np.int64)
    truth_count = np.zeros(n_groups, dtype=np.int64)
    for i, (score, truth) in enumerate(zip(volumes, truths, strict=True)):
        index = _bin_index(score.ravel(), low, scale, n_bins)
        g = group_of[i]
        hist[g] += np.bincount(index, minlength=n_bins)
        hist_lesion[g] += np.bincount(index[truth.ravel()], minlength=n_bins)
        truth_count[g] += int(truth.sum())

    # Edge j in [-1, n_bins - 1] predicts the voxels of bins > j; column j + 1 below.
    def counts_above(h: np.ndarray) -> np.ndarray:
        suffix = np.cumsum(h[:, ::-1], axis=1)[:, ::-1]
        return np.concatenate([suffix, np.zeros((h.shape[0], 1), dtype=h.dtype)], axis=1)

    above, above_lesion = counts_above(hist), counts_above(hist_lesion)
    edge_objective = _objective(_dice_matrix(above, above_lesion, truth_count))
    best_edge = int(np.nanargmax(edge_objective)) - 1

    # Pass 2: exact objective at every distinct value of bins best_edge and best_edge + 1.
    # Candidate t = value u predicts {score > u}: the voxels above bin best_edge + 1 plus the
    # gathered ones greater than u.
    refine_bins = [b for b in (best_edge, best_edge + 1) if 0 <= b < n_bins]
    base = above[:, best_edge + 2] if best_edge + 2 <= n_bins else np.zeros(n_groups, np.int64)
    base_lesion = (
        above_lesion[:, best_edge + 2] if best_edge + 2 <= n_bins else np.zeros(n_groups, np.int64)
    )
    gathered: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_groups)]
    for i, (score, truth) in enumerate(zip(volumes, truths, strict=True)):
        flat = score.ravel()
        index = _bin_index(flat, low, scale, n_bins)
        selected = np.isin(index, refine_bins)
        values = flat[selected].astype(np.float64)
        gathered[group_of[i]].append((values, truth.ravel()[selected]))
    group_values, group_all, group_lesion = [], [], []
    for parts in gathered:
        values = np.concatenate([v for v, _ in parts]) if parts else np.zeros(0)
        lesion = np.concatenate([t for _, t in parts]) if parts else np.zeros(0, bool)
        # Collapse ties (e.g. a background of exact zeros) before the per-candidate counts.
        unique, inverse = np.unique(values, return_inverse=True)
        group_values.append(unique)
        group_all.append(np.bincount(inverse, minlength=unique.size))
        group_lesion.append(np.bincount(inverse, weights=lesion, minlength=unique.size))
    candidates = np.unique(np.concatenate(group_values))
    best_threshold, best_score = None, -np.inf
    if candidates.size:
        above_c = np.empty((n_groups, candidates.size))
        above_lesion_c = np.empty((n_groups, candidates.size))
        for g in range(n_groups):
            # Counts of gathered values strictly greater than each candidate.
            position = np.searchsorted(group_values[g], candidates, side="right")
            suffix = np.concatenate([np.cumsum(group_all[g][::-1])[::-1], [0]])
            suffix_lesion = np.concatenate([np.cumsum(group_lesion[g][::-1])[::-1], [0]])
            above_c[g] = base[g] + suffix[position]
            above_lesion_c[g] = base_lesion[g] + suffix_lesion[position]
        refined = _objective(_dice_matrix(above_c, above_lesion_c, truth_count))
        if not np.all(np.isnan(refined)):
            k = int(np.nanargmax(refined))
            best_threshold, best_score = float(candidates[k]), float(refined[k])
    if best_edge == -1 and not (best_score > edge_objective[0]):
        # Predicting every voxel is best: a threshold just below the smallest score.
        dtype = np.result_type(*[v.dtype for v in volumes])
        dtype = dtype if dtype.kind == "f" else np.dtype(np.float64)
        smallest = min(float(v.min()) for v in volumes)
        best_threshold = float(np.nextafter(dtype.type(smallest), dtype.type(-np.inf)))
    if best_threshold is None:
        # Cannot happen: np.nanargmax returns the first best edge, so a best edge >= 0 has a
        # non-empty bin whose largest value reproduces it among the candidates.
        raise RuntimeError("validation_threshold: no candidate threshold (internal error)")
    return best_threshold
