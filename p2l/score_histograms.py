"""Fixed-size summaries of score volumes for the stored thresholds (spec §5.6, §7, §8.17).

Streaming evaluation (p2l.evaluate) never holds the voxels of a whole set: each volume is reduced
to a histogram on one shared grid, the histograms are summed over volumes and processes, and the
healthy quantile and the validation-tuned threshold are read off the sum. `p2l.thresholds` keeps
the exact functions (the faithful reference, used by the tests to check these).

The grid is fixed before any volume is seen and covers every float32 value, so no range has to
be guessed and nothing overflows. Post-processed scores are float32 and may be negative: the
combined score is log(error + 1e-10) + mean log-variance (spec §5.3, §8.16), masked to exactly 0
outside the brain (spec §5.5). A float32 is mapped to an order-preserving 32-bit key and a bin is
the top `KEY_BITS` bits of the key: sign, exponent and the top 11 mantissa bits. A bin is thus
an interval of float32 values of relative width 2**-11 (width <= |v| * 2**-11 ~ 0.05 % of the
value), and exact zeros (the background) sit in a bin of width ~1e-42. 2**20 bins of int64:
8 MB per histogram, whatever the number of volumes.

Tolerances (checked by tests/score_histograms_test.py against the exact functions):
- `quantile` vs `np.percentile(concatenated values, q)` (linear interpolation): |difference| <=
  2**-11 * max(|v_i|, |v_i+1|), v_i and v_i+1 the two order statistics interpolated (within a bin,
  values are placed evenly between the bin's bounds).
- `best_dice_threshold` vs `thresholds.validation_threshold(..., objective="pooled")`: the Dice at
  the returned threshold is exact (a threshold at a bin's upper bound splits the voxels exactly as
  the bins do, and `thresholds.predict` compares in float32); it is the best over all bin bounds,
  so it is below the exact optimum only when the optimum lies strictly inside a bin: the
  threshold differs by about one bin width, and the Dice by what moving the threshold within
  one bin can change it (< 1e-3 on the tests' volumes). Only the pooled objective is available
  here (the per-volume mean needs one histogram per volume).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from p2l.errors import DataError

KEY_BITS = 20
N_BINS = 1 << KEY_BITS
_SHIFT = 32 - KEY_BITS
_SIGN = np.uint32(0x80000000)


def _keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values: negatives bit-flipped, positives + 2**31."""
    # + 0 turns -0.0 into +0.0, which compares equal and must share its bin.
    v = np.asarray(values, np.float32).ravel() + np.float32(0)
    bits = v.view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def bin_index(values: np.ndarray) -> np.ndarray:
    """The bin of each value (float32), monotone non-decreasing in the value."""
    return (_keys(values) >> np.uint32(_SHIFT)).astype(np.intp)


def _key_to_float(keys: np.ndarray) -> np.ndarray:
    keys = np.atleast_1d(np.asarray(keys, np.uint32))
    bits = np.where(keys & _SIGN, keys & ~_SIGN, ~keys).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


def bin_bounds(bins) -> tuple[np.ndarray, np.ndarray]:
    """(smallest, largest) float32 value of each bin, as float64."""
    bins = np.atleast_1d(np.asarray(bins, np.int64))
    low = _key_to_float((bins << _SHIFT).astype(np.uint32))
    high = _key_to_float((((bins + 1) << _SHIFT) - 1).astype(np.uint32))
    return low, high


def bin_width(value: float) -> float:
    """Width of the bin holding `value`: the resolution of the thresholds near it."""
    low, high = bin_bounds(bin_index(np.float32(value)))
    return float(high[0] - low[0])


def _check_finite(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        raise DataError(name, f"score must be a real numeric array, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        bad = values.size - int(np.isfinite(values).sum())
        raise DataError(name, f"score has {bad} non-finite value(s)")
    return values


def volume_counts(values: np.ndarray, *, name: str = "volume") -> np.ndarray:
    """(N_BINS,) int64 histogram of one volume's values (e.g. its in-brain scores)."""
    values = _check_finite(values, name)
    return np.bincount(bin_index(values), minlength=N_BINS).astype(np.int64, copy=False)


def volume_counts_with_lesion(score: np.ndarray, seg: np.ndarray, *, name: str = "volume"):
    """(N_BINS, 2) int64: histogram of all voxels of a volume (column 0) and of its lesion
    voxels (seg > 0, column 1), in one pass. Every voxel counts, background included, as in the
    exact validation threshold and the per-volume Dice."""
    score = _check_finite(score, name)
    if np.shape(seg) != score.shape:
        raise DataError(name, f"seg shape {np.shape(seg)} does not match score shape {score.shape}")
    lesion = (np.asarray(seg) > 0).ravel()
    both = np.bincount(bin_index(score) * 2 + lesion, minlength=2 * N_BINS)
    both = both.reshape(N_BINS, 2)
    both[:, 0] += both[:, 1]
    return both.astype(np.int64, copy=False)


@dataclass
class Histogram:
    """A running sum of volume histograms: `counts` is (N_BINS,) or (N_BINS, 2)."""

    columns: int = 1
    volumes: int = 0
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.counts is None:
            shape = (N_BINS,) if self.columns == 1 else (N_BINS, self.columns)
            self.counts = np.zeros(shape, np.int64)

    def add(self, volume: np.ndarray) -> None:
        self.counts += volume
        self.volumes += 1

    def sparse(self) -> tuple:
        """The non-empty bins only (what processes exchange: kilobytes, not voxels)."""
        total = self.counts if self.counts.ndim == 1 else self.counts[:, 0]
        bins = np.flatnonzero(total)
        return self.columns, self.volumes, bins.astype(np.int32), self.counts[bins]

    @classmethod
    def merged(cls, sparse_parts) -> Histogram:
        """The sum of `sparse()` parts (e.g. every process's, from parallel.gather_objects)."""
        out = None
        for columns, volumes, bins, counts in sparse_parts:
            out = out or cls(columns)
            out.counts[bins] += counts
            out.volumes += volumes
        return out if out is not None else cls()


def _value_at_rank(cumulative: np.ndarray, counts: np.ndarray, rank: int) -> float:
    """Estimate of the rank-th smallest value (0-based): evenly spread within its bin."""
    b = int(np.searchsorted(cumulative, rank, side="right"))
    within = rank - (int(cumulative[b]) - int(counts[b]))
    low, high = bin_bounds(b)
    return float(low[0] + (within + 0.5) / int(counts[b]) * (high[0] - low[0]))


def quantile(counts: np.ndarray, q: float) -> float:
    """`np.percentile(values, q)` (linear interpolation) from the values' histogram.

    Tolerance: see the module docstring (<= 2**-11 of the interpolated values' magnitude)."""
    counts = np.asarray(counts, np.int64)
    n = int(counts.sum())
    if n == 0:
        raise DataError("healthy scores", "every healthy volume has an empty brain mask")
    # NumPy's "linear" method: virtual index (n - 1) * q / 100 between two order statistics.
    position = (n - 1) * (float(q) / 100.0)
    below = int(np.floor(position))
    fraction = position - below
    cumulative = np.cumsum(counts)
    low = _value_at_rank(cumulative, counts, below)
    if fraction == 0:
        return low
    high = _value_at_rank(cumulative, counts, min(below + 1, n - 1))
    return low + fraction * (high - low)


def best_dice_threshold(counts: np.ndarray) -> float:
    """The threshold t maximising the pooled Dice of `score > t` over all voxels counted in
    `counts` ((N_BINS, 2): all voxels, lesion voxels), searched at every bin's upper bound.

    Ties go to the smallest threshold, as in `thresholds.validation_threshold`. Tolerance: see the
    module docstring (exact Dice at the returned t; about one bin width from the exact optimum).
    """
    counts = np.asarray(counts, np.int64)
    total, lesion = counts[:, 0], counts[:, 1]
    n_truth = int(lesion.sum())
    if n_truth == 0:
        raise DataError("validation segs", "no lesion voxel in any validation volume")
    # Edge j in [-1, N_BINS - 1] predicts the voxels of bins > j (column j + 1).
    above = np.concatenate([np.cumsum(total[::-1])[::-1], [0]])
    above_lesion = np.concatenate([np.cumsum(lesion[::-1])[::-1], [0]])
    dice = 2.0 * above_lesion / (above + n_truth)  # n_truth > 0: never 0 / 0
    edge = int(np.argmax(dice)) - 1
    if edge == -1:
        # Every voxel predicted: the edge just below the first non-empty bin (bins below it are
        # empty, so it predicts the same voxels; bin 0 holds only NaN keys, never a score).
        edge = int(np.flatnonzero(total)[0]) - 1
    # The largest float32 of bin `edge`: `score > t` keeps exactly the bins above it.
    return float(bin_bounds(edge)[1][0])
