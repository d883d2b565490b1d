"""Per-volume evaluation metrics on the evaluation grid (spec §6).

Host numpy/scipy only. Fixes the reference's bugs (spec §6, §8.20):
- the confusion matrix is read in the right order (the reference called
  `confusion_matrix(pred, gt)`, so its TP/FP/TN/FN were TN/FN/FP/TP and its specificity was wrong);
- FPR is fp / (fp + tn) (the reference's `fpr()` computed fp / (fp + tp), the false discovery
  rate);
- per-slice metrics run over axial slices, `axis=2` of the (H, W, D) layout (the reference iterated
  over axis 0, sagittal planes).

Conventions: `seg` and `mask` are label maps binarised with > 0 (spec §2.2). Metrics that are
undefined for a volume are NaN (a ratio 0/0) or inf (a Hausdorff distance to an empty mask), never
an arbitrary number; `results_summary.aggregate` leaves them out and counts them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from p2l.errors import ConfigError, DataError
from p2l.postprocess import remove_small_components
from p2l.thresholds import ORACLE, ORACLE_STEPS, oracle_threshold, predict

# Spec §6: the reference reports the 100th-percentile Hausdorff distance; HD95 is the usual
# companion in the pDDPM literature.
HD_PERCENTILE = 95.0
# Project layout (H, W, D): axis 2 is the axial axis (spec §5.2).
AXIAL_AXIS = 2


def _as_bool(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == bool else array > 0


def _pair(pred: np.ndarray, gt: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise DataError(
            name, f"prediction shape {pred.shape} does not match ground truth {gt.shape}"
        )
    return pred, gt


def _scores_and_labels(
    scores: np.ndarray, labels: np.ndarray, name: str
) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape:
        raise DataError(
            name, f"score shape {scores.shape} does not match label shape {labels.shape}"
        )
    if scores.dtype == bool or not np.issubdtype(scores.dtype, np.number):
        raise DataError(name, f"scores must be real numbers, got dtype {scores.dtype}")
    if not np.isfinite(scores).all():
        raise DataError(name, f"{scores.size - int(np.isfinite(scores).sum())} non-finite score(s)")
    return scores.ravel(), _as_bool(labels).ravel()


def _ratio(numerator: float, denominator: float) -> float:
    return float("nan") if denominator == 0 else numerator / denominator


# --- ranking metrics over all voxels -------------------------------------------------------------


def _split_sorted(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Sorting the two classes separately (SIMD np.sort, no argsort) is fast on ~3.7 M voxels.
    return np.sort(scores[labels]), np.sort(scores[~labels])


def _auroc_sorted(positives: np.ndarray, negatives: np.ndarray) -> float:
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    # Mann-Whitney: each positive scores 1 per negative below it and 1/2 per tie, which is exactly
    # the trapezoidal area under sklearn's ROC curve. Twice the count is an exact int64.
    below = np.searchsorted(negatives, positives, side="left")
    below_or_tied = np.searchsorted(negatives, positives, side="right")
    twice_u = int(below.sum(dtype=np.int64)) + int(below_or_tied.sum(dtype=np.int64))
    return twice_u / (2.0 * positives.size * negatives.size)


def _auprc_sorted(positives: np.ndarray, negatives: np.ndarray) -> float:
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    # sklearn's average precision: sum over distinct thresholds t (descending) of
    # (R(t) - R(previous t)) * P(t), with predictions score >= t. Recall only moves at positive
    # scores, so it is a sum over the distinct positive values u of n_pos(u) / P * precision(u).
    values, first = np.unique(positives, return_index=True)
    n_at = np.diff(np.append(first, positives.size))
    true_pos = positives.size - first  # positives >= u
    false_pos = negatives.size - np.searchsorted(negatives, values, side="left")
    precision = true_pos / (true_pos + false_pos)
    return float(np.sum(n_at * precision) / positives.size)


def auroc(scores: np.ndarray, labels: np.ndarray, *, name: str = "volume") -> float:
    """Area under the ROC curve over all voxels, background included (spec §6, `AUCPerVol`).

    Equals sklearn's `roc_auc_score` (ties count 1/2); NaN when labels are all 0 or all 1, where
    the reference's `roc_curve` also gives NaN.
    """
    scores, labels = _scores_and_labels(scores, labels, name)
    return _auroc_sorted(*_split_sorted(scores, labels))


def auprc(scores: np.ndarray, labels: np.ndarray, *, name: str = "volume") -> float:
    """Average precision over all voxels, background included (spec §6, `AUPRCPerVol`).

    Equals sklearn's `average_precision_score`. NaN when there is no positive or no negative label
    (sklearn instead returns 0 with a warning when there is no positive).
    """
    scores, labels = _scores_and_labels(scores, labels, name)
    return _auprc_sorted(*_split_sorted(scores, labels))


# --- overlap metrics of a binary prediction ------------------------------------------------------


class Confusion(NamedTuple):
    """Voxel counts of a binary prediction against the ground truth (correct order, spec §6)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def dice(self) -> float:
        return _ratio(2.0 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def fpr(self) -> float:
        return _ratio(self.fp, self.fp + self.tn)


def confusion(pred: np.ndarray, gt: np.ndarray, *, name: str = "volume") -> Confusion:
    """TP, FP, TN, FN of `pred` against `gt` (both binarised with > 0)."""
    pred, gt = _pair(pred, gt, name)
    tp = int(np.count_nonzero(pred & gt))
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    return Confusion(tp=tp, fp=n_pred - tp, tn=pred.size - n_pred - n_gt + tp, fn=n_gt - tp)


def dice(pred: np.ndarray, gt: np.ndarray, *, name: str = "volume") -> float:
    """2|P∩G| / (|P| + |G|); NaN when both are empty, as the reference's 0/0 (spec §6)."""
    return confusion(pred, gt, name=name).dice


def precision(pred: np.ndarray, gt: np.ndarray, *, name: str = "volume") -> float:
    """TP / (TP + FP); NaN without any predicted voxel (sklearn's default would give 0)."""
    return confusion(pred, gt, name=name).precision


def recall(pred: np.ndarray, gt: np.ndarray, *, name: str = "volume") -> float:
    """TP / (TP + FN), the sensitivity; NaN without any lesion voxel."""
    return confusion(pred, gt, name=name).recall


def specificity(pred: np.ndarray, gt: np.ndarray, *, name: str = "volume") -> float:
    """TN / (TN + FP), from the correctly ordered confusion matrix (the reference's was swapped)."""
    return confusion(pred, gt, name=name).specificity


def fpr(pred: np.ndarray, gt: np.ndarray, *, name: str = "volume") -> float:
    """False positive rate FP / (FP + TN) (the reference's `fpr` was FP / (FP + TP), the FDR)."""
    return confusion(pred, gt, name=name).fpr


# --- Hausdorff distance --------------------------------------------------------------------------


def _edges(mask: np.ndarray) -> np.ndarray:
    # MONAI `get_mask_edges`: mask XOR its erosion by the 6-neighbour cross, outside = background.
    return mask ^ ndimage.binary_erosion(mask)


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray] | float:
    """Directed edge distances (pred -> gt, gt -> pred), or NaN / inf when a mask is empty."""
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return float("nan")  # MONAI: empty surface distance arrays -> NaN
    if not has_pred or not has_gt:
        return float("inf")  # MONAI: distances to an empty edge set are inf
    # Crop to the bounding box of the union, as MONAI's `crop=True`: every edge voxel of both masks
    # lies inside it, so edges and distances are unchanged and the distance transforms are smaller.
    box = ndimage.find_objects((pred | gt).astype(np.int8))[0]
    pred_edges, gt_edges = _edges(pred[box]), _edges(gt[box])
    to_gt = ndimage.distance_transform_edt(~gt_edges, sampling=spacing)[pred_edges]
    to_pred = ndimage.distance_transform_edt(~pred_edges, sampling=spacing)[gt_edges]
    return to_gt, to_pred


def _symmetric(distances: tuple[np.ndarray, np.ndarray] | float, percentile: float | None) -> float:
    """The larger directed distance (maximum, or the percentile); NaN / inf pass through."""
    if isinstance(distances, float):
        return distances
    pick = lambda d: d.max() if percentile is None else np.percentile(d, percentile)  # noqa: E731
    return float(max(pick(d) for d in distances))


def _check_percentile(percentile: float | None) -> None:
    # MONAI's `if not percentile` treats 0 as "maximum"; an explicit 0 is rejected instead.
    if percentile is not None and not 0 < percentile <= 100:
        raise ConfigError("hausdorff_percentile", f"must be in (0, 100] or None, got {percentile}")


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ConfigError("spacing", f"must be {ndim} positive voxel sizes, got {spacing}")
    return spacing


def hausdorff(
    pred: np.ndarray,
    gt: np.ndarray,
    percentile: float | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    name: str = "volume",
) -> float:
    """Symmetric Hausdorff distance between the mask surfaces, MONAI semantics (spec §6).

    As `monai.metrics.compute_hausdorff_distance(pred, gt, include_background=False,
    distance_metric="euclidean", percentile=percentile, directed=False)` on one lesion channel
    (MONAI keeps a single channel even without background): surfaces are mask XOR eroded mask,
    each directed distance is the maximum (or the percentile, linear interpolation) of the
    Euclidean distance transform of the other surface at this surface's voxels, and the result is
    the larger of the two. Units: `spacing` (1 mm voxels on the evaluation grid, spec §6).
    NaN when both masks are empty; inf when exactly one is (the reference's mean skipped both).
    """
    pred, gt = _pair(pred, gt, name)
    _check_percentile(percentile)
    return _symmetric(_surface_distances(pred, gt, _check_spacing(spacing, pred.ndim)), percentile)


# --- per-slice metrics ---------------------------------------------------------------------------


def _check_axis(axis: int, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not -ndim <= axis < ndim:
        raise ConfigError("slice_axis", f"must be an axis of a {ndim}-D volume, got {axis!r}")
    return int(axis) % ndim


def slice_dice(
    pred: np.ndarray, gt: np.ndarray, axis: int = AXIAL_AXIS, *, name: str = "volume"
) -> np.ndarray:
    """Dice of each slice along `axis` that contains lesion, in slice order (spec §6).

    Default axis 2 = axial in the (H, W, D) layout; the reference iterated over axis 0 (sagittal)
    by mistake (spec §8.20), pass axis=0 to reproduce it.
    """
    pred, gt = _pair(pred, gt, name)
    axis = _check_axis(axis, pred.ndim)
    other = tuple(a for a in range(pred.ndim) if a != axis)
    tp = np.count_nonzero(pred & gt, axis=other)
    n_pred, n_gt = np.count_nonzero(pred, axis=other), np.count_nonzero(gt, axis=other)
    lesion = n_gt > 0
    return 2.0 * tp[lesion] / (n_pred[lesion] + n_gt[lesion])


def slice_detection(
    score: np.ndarray,
    seg: np.ndarray,
    mask: np.ndarray,
    axis: int = AXIAL_AXIS,
    *,
    name: str = "volume",
) -> tuple[float, float]:
    """Slice-level anomaly detection (AUROC, AUPRC) of one volume (spec §6).

    Each slice along `axis` scores the mean of `score` over its brain voxels (mask > 0; 0.0 for a
    slice without brain, as the reference) and is labelled 1 when it contains lesion. NaN when all
    slices have the same label.
    """
    score, labels = _scores_and_labels(score, seg, name)
    shape = np.shape(seg)
    mask = _as_bool(mask)
    if mask.shape != shape:
        raise DataError(name, f"mask shape {mask.shape} does not match score shape {shape}")
    axis = _check_axis(axis, len(shape))
    other = tuple(a for a in range(len(shape)) if a != axis)
    score = score.reshape(shape).astype(np.float64)
    brain = np.count_nonzero(mask, axis=other)
    total = np.where(mask, score, 0.0).sum(axis=other)
    slice_score = np.where(brain > 0, total / np.maximum(brain, 1), 0.0)
    slice_label = labels.reshape(shape).any(axis=other)
    positives, negatives = _split_sorted(slice_score, slice_label)
    return _auroc_sorted(positives, negatives), _auprc_sorted(positives, negatives)


# --- everything for one volume, and aggregation --------------------------------------------------


def volume_metrics(
    score: np.ndarray,
    seg: np.ndarray,
    mask: np.ndarray,
    thresholds: Mapping[str, float],
    *,
    oracle: bool = True,
    oracle_steps: int = ORACLE_STEPS,
    min_component_voxels: int = 0,
    axis: int = AXIAL_AXIS,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    hausdorff_distances: bool = True,
    name: str = "volume",
) -> dict[str, float]:
    """All metrics of one post-processed score volume, as a flat dict of floats (spec §6).

    Threshold-free: "auroc", "auprc" (all voxels), "slice_auroc", "slice_auprc" (see
    `slice_detection`), "lesion_voxels", "lesion_slices".

    Per threshold policy p — "oracle" (per-volume bisection, when `oracle`) first, then each entry
    of `thresholds` (e.g. {"validation": t1, "healthy_q98": t2}) — with prediction `score > t`:
    "threshold[p]", "dice[p]", "precision[p]", "recall[p]", "specificity[p]", "fpr[p]",
    "tp[p]", "fp[p]", "tn[p]", "fn[p]", "slice_dice[p]" (mean Dice over the lesion slices along
    `axis`), and unless `hausdorff_distances` is False "hd[p]" (maximum) and "hd95[p]".

    `min_component_voxels` > 0 removes 26-connected components of at most that many voxels from
    each prediction (pDDPM protocol, spec §8.15); the oracle threshold is still searched on the
    unfiltered prediction, as pDDPM did, so "dice[oracle]" is then the filtered Dice at it.
    The reference pooled the per-slice Dice of all volumes; "slice_dice[p]" * "lesion_slices"
    summed over volumes and divided by the summed "lesion_slices" recovers that.
    """
    score, labels = _scores_and_labels(score, seg, name)
    shape = np.shape(seg)
    score = score.reshape(shape)
    truth = labels.reshape(shape)
    mask = _as_bool(mask)
    if mask.shape != shape:
        raise DataError(name, f"mask shape {mask.shape} does not match score shape {shape}")
    axis = _check_axis(axis, len(shape))
    spacing = _check_spacing(spacing, len(shape))
    if oracle and ORACLE in thresholds:
        raise ConfigError("thresholds", "'oracle' is computed per volume; do not pass it")
    for policy, value in thresholds.items():
        if not isinstance(policy, str) or not policy or "[" in policy or "]" in policy:
            raise ConfigError("thresholds", f"policy names must be plain strings, got {policy!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"thresholds.{policy}", f"must be a finite number, got {value!r}")

    positives, negatives = _split_sorted(score.ravel(), truth.ravel())
    slice_auroc, slice_auprc = slice_detection(score, truth, mask, axis, name=name)
    row: dict[str, float] = {
        "auroc": _auroc_sorted(positives, negatives),
        "auprc": _auprc_sorted(positives, negatives),
        "slice_auroc": slice_auroc,
        "slice_auprc": slice_auprc,
        "lesion_voxels": float(positives.size),
        "lesion_slices": float(
            np.count_nonzero(truth.any(axis=tuple(a for a in range(truth.ndim) if a != axis)))
        ),
    }
    policies: dict[str, float] = {}
    if oracle:
        _, policies[ORACLE] = oracle_threshold(score, truth, oracle_steps, name=name)
    policies.update({str(k): float(v) for k, v in thresholds.items()})

    for policy, threshold in policies.items():
        pred = predict(score, threshold)
        if min_component_voxels:
            pred = remove_small_components(pred, min_component_voxels)
        counts = confusion(pred, truth, name=name)
        per_slice = slice_dice(pred, truth, axis, name=name)
        row[f"threshold[{policy}]"] = float(threshold)
        row[f"dice[{policy}]"] = counts.dice
        row[f"precision[{policy}]"] = counts.precision
        row[f"recall[{policy}]"] = counts.recall
        row[f"specificity[{policy}]"] = counts.specificity
        row[f"fpr[{policy}]"] = counts.fpr
        for field in Confusion._fields:
            row[f"{field}[{policy}]"] = float(getattr(counts, field))
        row[f"slice_dice[{policy}]"] = float(per_slice.mean()) if per_slice.size else float("nan")
        if hausdorff_distances:
            distances = _surface_distances(pred, truth, spacing)
            for key, pct in (("hd", None), ("hd95", HD_PERCENTILE)):
                row[f"{key}[{policy}]"] = _symmetric(distances, pct)
    return row
