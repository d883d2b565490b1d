"""Uncertainty report: is the predicted variance calibrated on healthy patches, and do error and
variance rise with lesion content (the paper's patch-level analysis)?

Both analyses run on the model's outputs on the non-overlapping patch grid with >= 20 % brain
(p2l.patch_outputs; spec §5, "Abnormality analysis mode"). Notation per patch and coordinate
d in (y, x): mean mu_d, target t_d (0-100 units), log-variance s_d = log sigma_d^2 (spec §4).

Calibration (`Calibration`, healthy held-out volumes): if t_d ~ N(mu_d, sigma_d^2),
- coverage: P(|mu_d - t_d| <= z_p sigma_d) = p for the central p-interval (z_p below);
- reliability: E[(mu_d - t_d)^2 | s_d] = exp(s_d), checked in quantile bins of exp(s_d), both
  coordinates pooled (observed mean squared error against mean predicted variance per bin);
- Gaussian NLL 0.5 (log 2 pi + s_d + (mu_d - t_d)^2 e^{-s_d}), with the constant the training
  losses leave out (spec §4), so that it is a proper NLL in nats.

Lesion sets (`LesionAnalysis`), as the reference's abnormality analysis (spec §5):
logerror = log(||mu - t||^2 + 0.5), logvar = mean_d s_d, combined = logerror + logvar;
one-sided (alternative 'greater') Spearman correlations of the patch's lesion fraction with each
score; patches with lesion fraction < 0.1 are normal, > 0.9 abnormal; KL(abnormal || normal) =
E_abnormal[log p_abnormal / p_normal] between Gaussian fits (closed form) of (logerror, logvar)
and of each score alone; the reverse direction is reported too, as the reference's is unknown.

Bounded memory (the number of volumes is unbounded): everything that is a sum — coverage, NLL,
mean log-variance, RMS error, the class counts and the Gaussian fits (mean and covariance by
Chan's pairwise update, ddof=1 as np.cov) — is exact over every patch seen. What needs the
sample itself — reliability bins, Spearman ranks, KDE plots — uses a seeded uniform reservoir of
at most `max_patches` patches per set (`Reservoir`); the JSON says which is which and gives
patches_seen / patches_kept.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from p2l import uncertainty_figures
from p2l.atomic_write import write_json_atomic
from p2l.errors import ConfigError
from p2l.patch_outputs import GridPredictor, VolumeOutputs
from p2l.results_summary import json_safe

MAX_PATCHES = 200_000  # reservoir capacity per set: 200k x 4 float64 = 6.4 MB
COVERAGE_Z = {0.5: 0.6745, 0.9: 1.6449, 0.95: 1.9600}  # two-sided Gaussian quantiles
COORDS = ("y", "x")
LOGERROR_OFFSET = 0.5  # log(||mu - t||^2 + 0.5), the reference's analysis (spec §5)
NORMAL_BELOW, ABNORMAL_ABOVE = 0.1, 0.9  # lesion-fraction classes (spec §5)
SCORES = ("logerror", "logvar", "combined")
RELIABILITY_BINS = 10
PLOT_POINTS = 5000  # points per class handed to the KDE plots
PLOT_DATA = "plot_data"  # key of the arrays for the figures; never written to the JSON
LOG_2PI = math.log(2.0 * math.pi)


class Reservoir:
    """A uniform random sample of at most `capacity` rows of a stream (Algorithm R, vectorised).

    Memory is `capacity` x `columns` float64 whatever the stream's length. The draws depend only
    on the seed and on the row count so far, so the same stream and seed give the same sample.
    """

    def __init__(self, columns: int, capacity: int = MAX_PATCHES, seed=0):
        if isinstance(capacity, bool) or int(capacity) < 1:
            raise ConfigError("uncertainty.max_patches", f"must be >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self.seen = 0
        self._rows = np.zeros((self.capacity, int(columns)), np.float64)
        self._rng = np.random.default_rng(seed)

    def add(self, rows) -> None:
        rows = np.asarray(rows, np.float64).reshape(-1, self._rows.shape[1])
        n = len(rows)
        fill = min(max(self.capacity - self.seen, 0), n)
        self._rows[self.seen : self.seen + fill] = rows[:fill]
        if fill < n:
            source = np.arange(fill, n)
            # Row i (0-based over the stream) replaces slot j ~ U{0..i} when j < capacity; the
            # draws do not depend on the contents, so drawing them at once is Algorithm R.
            slot = self._rng.integers(0, self.seen + source + 1)
            hit = slot < self.capacity
            slot, source = slot[hit], source[hit]
            # In stream order a slot hit twice keeps the later row.
            _, first_from_end = np.unique(slot[::-1], return_index=True)
            last = len(slot) - 1 - first_from_end
            self._rows[slot[last]] = rows[source[last]]
        self.seen += n

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def rows(self) -> np.ndarray:
        return self._rows[: len(self)].copy()


class Moments:
    """Streaming mean and covariance of k-vectors (Chan et al.'s pairwise update: stable)."""

    def __init__(self, k: int):
        self.n = 0
        self.mean = np.zeros(k)
        self._m2 = np.zeros((k, k))

    def add(self, x) -> None:
        x = np.asarray(x, np.float64).reshape(-1, len(self.mean))
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(axis=0)
        dev = x - mb
        delta, n = mb - self.mean, self.n + nb
        self._m2 = self._m2 + dev.T @ dev + np.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n

    def cov(self) -> np.ndarray:
        """Sample covariance (ddof=1, np.cov's); NaN below two samples."""
        return self._m2 / (self.n - 1) if self.n > 1 else np.full_like(self._m2, np.nan)


def gaussian_kl(mean0, cov0, mean1, cov1) -> float:
    """KL(N0 || N1) in nats, closed form:
    0.5 [tr(S1^-1 S0) + (m1 - m0)^T S1^-1 (m1 - m0) - k + ln(det S1 / det S0)].
    NaN when a covariance is not positive definite (or not finite)."""
    m0, m1 = np.atleast_1d(mean0).astype(float), np.atleast_1d(mean1).astype(float)
    s0, s1 = np.atleast_2d(cov0).astype(float), np.atleast_2d(cov1).astype(float)
    if not all(np.isfinite(a).all() for a in (m0, m1, s0, s1)):
        return math.nan
    (sign0, logdet0), (sign1, logdet1) = np.linalg.slogdet(s0), np.linalg.slogdet(s1)
    if sign0 <= 0 or sign1 <= 0:
        return math.nan
    d = m1 - m0
    quad = np.trace(np.linalg.solve(s1, s0)) + d @ np.linalg.solve(s1, d)
    return float(0.5 * (quad - len(m0) + logdet1 - logdet0))


def patch_scores(out: VolumeOutputs) -> np.ndarray:
    """(N, 3) float64 logerror, logvar, combined of each patch (spec §5, abnormality mode)."""
    sq = np.sum(np.square(out.mean.astype(np.float64) - out.target), axis=1)
    logerror = np.log(sq + LOGERROR_OFFSET)
    logvar = out.logvar.astype(np.float64).mean(axis=1)
    return np.stack([logerror, logvar, logerror + logvar], axis=1)


def reliability(variance, squared_error, bins: int = RELIABILITY_BINS) -> dict:
    """Quantile bins of the predicted variance: per bin its mean, the observed mean squared error
    and the count (empty bins, from ties, are dropped), and the count-weighted mean
    |ln(observed / predicted)| (0 when calibrated)."""
    var, sq = np.asarray(variance, float).ravel(), np.asarray(squared_error, float).ravel()
    if var.size == 0:
        return {"bins": 0, "predicted_variance": [], "observed_mse": [], "count": [],
                "mean_abs_log_ratio": math.nan}  # fmt: skip
    edges = np.quantile(var, np.linspace(0.0, 1.0, bins + 1))
    which = np.clip(np.searchsorted(edges[1:-1], var, side="right"), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    used = count > 0
    pred = np.bincount(which, var, minlength=bins)[used] / count[used]
    obs = np.bincount(which, sq, minlength=bins)[used] / count[used]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(np.log(obs / pred))
    return {"bins": int(used.sum()), "edges": edges.tolist(), "predicted_variance": pred.tolist(),
            "observed_mse": obs.tolist(), "count": count[used].tolist(),
            "mean_abs_log_ratio": float(np.average(ratio, weights=count[used]))}  # fmt: skip


def spearman_greater(x, y) -> dict:
    """scipy's one-sided ('greater') Spearman rho and p; None when undefined (constant input)."""
    from scipy import stats

    if len(x) < 3:
        return {"rho": None, "p": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning: the NaN says it
        res = stats.spearmanr(x, y, alternative="greater")
    return {"rho": float(res.statistic), "p": float(res.pvalue)}


class _Stream:
    """What both analyses count: volumes, grid patches, non-finite patches (left out of every
    statistic: e.g. a float16 forward that overflowed), and the seeded reservoir."""

    def __init__(self, columns: int, max_patches: int, seed):
        self.seed, self.reservoir = seed, Reservoir(columns, max_patches, seed)
        self.volumes = self.grid_patches = self.nonfinite_patches = 0

    def _finite(self, out: VolumeOutputs, rows: np.ndarray) -> np.ndarray:
        ok = np.isfinite(rows).all(axis=1)
        self.volumes += 1
        self.grid_patches += out.grid_patches
        self.nonfinite_patches += int((~ok).sum())
        self.reservoir.add(rows[ok])
        return rows[ok]

    def _fields(self) -> dict:
        r = self.reservoir
        return {"volumes": self.volumes, "grid_patches": self.grid_patches, "patches_seen": r.seen,
                "patches_kept": len(r), "nonfinite_patches": self.nonfinite_patches,
                "reservoir_capacity": r.capacity, "seed": self.seed}  # fmt: skip


class Calibration(_Stream):
    """Calibration of the predicted variance on healthy patches; `add` each volume's outputs."""

    def __init__(self, max_patches: int = MAX_PATCHES, seed=0, bins: int = RELIABILITY_BINS):
        super().__init__(4, max_patches, seed)  # reservoir rows: err_y, err_x, s_y, s_x
        self.bins = bins
        self._covered = np.zeros((len(COVERAGE_Z), 2))
        self._sums = {k: np.zeros(2) for k in ("nll", "logvar", "sq_error")}

    def add(self, out: VolumeOutputs) -> None:
        rows = np.concatenate([out.mean.astype(np.float64) - out.target, out.logvar], axis=1)
        rows = self._finite(out, rows)
        err, s = rows[:, :2], rows[:, 2:]
        sq, sigma = np.square(err), np.exp(0.5 * s)
        for i, z in enumerate(COVERAGE_Z.values()):
            self._covered[i] += np.sum(np.abs(err) <= z * sigma, axis=0)
        with np.errstate(over="ignore"):  # s << 0 with a large error: an infinite NLL is right
            self._sums["nll"] += np.sum(0.5 * (LOG_2PI + s + sq * np.exp(-s)), axis=0)
        self._sums["logvar"] += s.sum(axis=0)
        self._sums["sq_error"] += sq.sum(axis=0)

    def result(self) -> dict:
        n = self.reservoir.seen or math.nan  # no patch: every mean is NaN (null in the JSON)
        per = lambda v: dict(zip(COORDS, (float(a) for a in v), strict=True))  # noqa: E731
        sample = self.reservoir.rows()
        return {
            **self._fields(),
            "exact_over_all_patches": ["coverage", "nll", "mean_logvar", "rms_error"],
            "from_reservoir": ["reliability"],
            "coverage": {
                f"{p:g}": {"nominal": p, "z": z, "observed": per(self._covered[i] / n)}
                for i, (p, z) in enumerate(COVERAGE_Z.items())
            },
            "nll": per(self._sums["nll"] / n),
            "mean_logvar": per(self._sums["logvar"] / n),
            "rms_error": per(np.sqrt(self._sums["sq_error"] / n)),
            "reliability": reliability(np.exp(sample[:, 2:]), np.square(sample[:, :2]), self.bins),
        }


class LesionAnalysis(_Stream):
    """The paper's patch-level analysis on one lesion set; `add` each volume's outputs.

    Volumes without a segmentation are counted and skipped (no lesion fraction)."""

    def __init__(self, max_patches: int = MAX_PATCHES, seed=0):
        super().__init__(4, max_patches, seed)  # reservoir rows: the 3 scores, lesion fraction
        self.volumes_without_seg = 0
        self.fits = {"normal": Moments(2), "abnormal": Moments(2)}  # of (logerror, logvar)

    def add(self, out: VolumeOutputs) -> None:
        if out.lesion_fraction is None:
            self.volumes_without_seg += 1
            return
        rows = self._finite(out, np.column_stack([patch_scores(out), out.lesion_fraction]))
        self.fits["normal"].add(rows[rows[:, 3] < NORMAL_BELOW, :2])
        self.fits["abnormal"].add(rows[rows[:, 3] > ABNORMAL_ABOVE, :2])

    def _kl(self, p: str, q: str) -> dict:
        """KL(p || q) of the 2-D fits and of each score's 1-D fit (marginals; combined is the
        sum of the two coordinates: mean m0 + m1, variance S00 + S11 + 2 S01)."""
        mp, sp, mq, sq = (self.fits[p].mean, self.fits[p].cov(), self.fits[q].mean,
                          self.fits[q].cov())  # fmt: skip
        one = np.ones(2)
        return {
            "2d": gaussian_kl(mp, sp, mq, sq),
            "logerror": gaussian_kl(mp[0], sp[0, 0], mq[0], sq[0, 0]),
            "logvar": gaussian_kl(mp[1], sp[1, 1], mq[1], sq[1, 1]),
            "combined": gaussian_kl(mp.sum(), one @ sp @ one, mq.sum(), one @ sq @ one),
        }

    def result(self) -> dict:
        sample = self.reservoir.rows()
        lesion = sample[:, 3]
        rng = np.random.default_rng([*np.atleast_1d(self.seed), 1])  # plot subsample only
        plot = {}
        for name, sel in (("normal", lesion < NORMAL_BELOW), ("abnormal", lesion > ABNORMAL_ABOVE)):
            idx = np.flatnonzero(sel)
            if idx.size > PLOT_POINTS:
                idx = np.sort(rng.choice(idx, PLOT_POINTS, replace=False))
            plot[name] = sample[idx, :3]
        return {
            **self._fields(),
            "volumes_without_seg": self.volumes_without_seg,
            "exact_over_all_patches": ["normal_patches", "abnormal_patches", "gaussian_fits", "kl"],
            "from_reservoir": ["spearman", "plots"],
            "normal_below": NORMAL_BELOW,
            "abnormal_above": ABNORMAL_ABOVE,
            "logerror": "log(||mu - t||^2 + 0.5)",
            "normal_patches": self.fits["normal"].n,
            "abnormal_patches": self.fits["abnormal"].n,
            "spearman_alternative": "greater",
            "spearman": {
                s: spearman_greater(lesion, sample[:, i]) for i, s in enumerate(SCORES)
            },  # lesion fraction vs each score
            "gaussian_fit_axes": list(SCORES[:2]),
            "gaussian_fits": {
                k: {"n": m.n, "mean": m.mean.tolist(), "cov": m.cov().tolist()}
                for k, m in self.fits.items()
            },
            "kl": {"direction": "KL(abnormal || normal)", **self._kl("abnormal", "normal")},
            "kl_reverse": {"direction": "KL(normal || abnormal)", **self._kl("normal", "abnormal")},
            PLOT_DATA: plot,
        }


def scalars(results: Mapping) -> dict[str, float]:
    out = {}
    healthy = results.get("healthy")
    if healthy:
        for level, cov in healthy["coverage"].items():
            for c in COORDS:
                out[f"uncertainty/healthy/coverage{float(level) * 100:g}_{c}"] = cov["observed"][c]
        for key in ("nll", "mean_logvar", "rms_error"):
            out.update({f"uncertainty/healthy/{key}_{c}": healthy[key][c] for c in COORDS})
        rel = healthy["reliability"]["mean_abs_log_ratio"]
        out["uncertainty/healthy/reliability_abs_log_ratio"] = rel
    for name, res in results.get("lesion_sets", {}).items():
        for score, sp in res["spearman"].items():
            out[f"uncertainty/{name}/spearman_{score}"] = sp["rho"]
        for key in ("2d", *SCORES):
            out[f"uncertainty/{name}/kl_{key}"] = res["kl"][key]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def write_report(results: Mapping, out_dir: str | Path, tb_writer=None, step: int = 0) -> dict:
    """Writes `out_dir/uncertainty.json` (atomically; without the plot arrays), `calibration.png`
    when there is a healthy result, `<set>_patch_kde.png` per lesion set (set name lower-cased),
    and, given a clu metric writer, the scalars and PNGs under "uncertainty/...".
    Returns the JSON payload."""
    out_dir = Path(out_dir)
    payload = json_safe({
        "healthy": results.get("healthy"),
        "lesion_sets": {name: {k: v for k, v in res.items() if k != PLOT_DATA}
                        for name, res in results.get("lesion_sets", {}).items()},
        **{k: v for k, v in results.items() if k not in ("healthy", "lesion_sets")},
    })  # fmt: skip
    write_json_atomic(out_dir / "uncertainty.json", payload)
    images = {}  # figures read the JSON-safe numbers (NaN -> None) and the plot arrays
    if payload["healthy"]:
        path = uncertainty_figures.calibration(out_dir / "calibration.png", payload["healthy"])
        images["uncertainty/calibration"] = path
    for name, res in results.get("lesion_sets", {}).items():
        # Set file names lower-cased, as p2l.evaluate writes them (`brats21_volumes.csv`).
        path = uncertainty_figures.patch_kde(out_dir / f"{name.lower()}_patch_kde.png",
                                             res.get(PLOT_DATA, {}), payload["lesion_sets"][name],
                                             title=name)  # fmt: skip
        images[f"uncertainty/{name}/patch_kde"] = path
    if tb_writer is not None:
        tb_writer.write_scalars(int(step), scalars(payload))
        arrays = {k: uncertainty_figures.image_array(p) for k, p in images.items()}
        tb_writer.write_images(int(step), arrays)
        tb_writer.flush()
    return payload


def run(config, model, variables, healthy_volumes: Iterable | None,
        lesion_sets: Mapping[str, Iterable], out_dir: str | Path, tb_writer=None, step: int = 0,
        *, max_patches: int = MAX_PATCHES, seed: int = 0) -> dict:  # fmt: skip
    """The uncertainty report of a model: calibration on `healthy_volumes` and the patch-level
    lesion analysis on each of `lesion_sets`, written by `write_report` into `out_dir`.

    Volumes are objects with subject_id, image, mask, seg (H, W, D), e.g.
    `slices_builder.VolumeRecord`; they are streamed, one or two held at a time. Patch side,
    rejection rate, batch size and dtype come from the config as in training and evaluation.
    This process's volumes only: call it on one process (or on each with its own out_dir).
    Returns the JSON payload.
    """
    predictor = GridPredictor.from_config(config, model, variables)
    # Per-set seeds stable across processes and dict orders (str hash() is salted).
    set_seed = lambda name: [int(seed), zlib.crc32(name.encode())]  # noqa: E731
    results = {"grid": predictor.describe(), "max_patches": int(max_patches), "seed": int(seed)}
    if healthy_volumes is not None:
        calibration = Calibration(max_patches, set_seed("healthy"))
        for out in predictor.stream(healthy_volumes):
            calibration.add(out)
        results["healthy"] = calibration.result()
    results["lesion_sets"] = {}
    for name, volumes in lesion_sets.items():
        analysis = LesionAnalysis(max_patches, set_seed(name))
        for out in predictor.stream(volumes):
            analysis.add(out)
        results["lesion_sets"][name] = analysis.result()
    return write_report(results, out_dir, tb_writer, step)
