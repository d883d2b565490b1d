"""Figures of the uncertainty report (p2l.uncertainty): calibration on healthy patches, and the
paper's normal-vs-abnormal patch densities in (logerror, logvar) (spec §5, abnormality mode).

Written atomically as PNG with matplotlib's Agg backend (no display), as p2l.figures.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from p2l.figures import save  # noqa: E402

CLASSES = (("normal", "tab:blue"), ("abnormal", "tab:red"))
SCORE_LABELS = ("log(||mu - t||^2 + 0.5)", "mean log-variance", "logerror + logvar")


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9)


def calibration(path: Path, healthy: dict) -> Path:
    """Reliability (mean predicted variance vs observed mean squared error per quantile bin, log
    axes, the diagonal is perfect calibration) and observed vs nominal interval coverage."""
    fig, (ax_rel, ax_cov) = plt.subplots(1, 2, figsize=(10, 4.2))
    rel = healthy.get("reliability") or {}
    pred = np.asarray(rel.get("predicted_variance") or [], float)
    obs = np.asarray(rel.get("observed_mse") or [], float)
    ok = (pred > 0) & (obs > 0) & np.isfinite(pred) & np.isfinite(obs)
    if ok.any():
        lo = min(pred[ok].min(), obs[ok].min()) / 1.5
        hi = max(pred[ok].max(), obs[ok].max()) * 1.5
        ax_rel.plot([lo, hi], [lo, hi], color="grey", linestyle="--", label="calibrated")
        ax_rel.plot(pred[ok], obs[ok], "o-", color="tab:blue", label="healthy patches")
        ax_rel.set_xscale("log")
        ax_rel.set_yscale("log")
        ax_rel.legend(fontsize=8)
    else:
        _note(ax_rel, "no healthy patches")
    ax_rel.set_xlabel("predicted variance exp(s) (bin mean)")
    ax_rel.set_ylabel("observed mean squared error")
    ax_rel.set_title(f"reliability ({rel.get('bins', 0)} quantile bins, y and x pooled)")

    levels = list((healthy.get("coverage") or {}).items())
    pos = np.arange(len(levels))
    width = 0.27
    nominal = [c["nominal"] for _, c in levels]
    ax_cov.bar(pos - width, nominal, width, color="lightgrey", label="nominal")
    for k, (coord, colour) in enumerate((("y", "tab:blue"), ("x", "tab:orange"))):
        values = [c["observed"][coord] for _, c in levels]
        values = [np.nan if v is None else v for v in values]
        bars = ax_cov.bar(pos + k * width, values, width, color=colour, label=f"observed {coord}")
        ax_cov.bar_label(bars, fmt="%.2f", fontsize=7)
    ax_cov.set_xticks(pos, [f"{float(p):.0%}" for p, _ in levels])
    ax_cov.set_ylim(0, 1.05)
    ax_cov.set_xlabel("central Gaussian interval")
    ax_cov.set_ylabel("fraction of patches inside")
    ax_cov.set_title("coverage")
    ax_cov.legend(fontsize=8, loc="upper left")
    n = healthy.get("patches_seen", 0)
    fig.suptitle(f"Calibration on healthy patches ({n:,} patches, volumes: "
                 f"{healthy.get('volumes', 0)})")  # fmt: skip
    return save(fig, path, dpi=100)


def image_array(path: Path) -> np.ndarray:
    """(1, H, W, 3) uint8 of a written PNG, as clu's `write_images` takes (C in 1 or 3)."""
    import matplotlib.image

    rgba = matplotlib.image.imread(path)
    rgb = rgba[..., :3] if rgba.dtype == np.uint8 else np.round(rgba[..., :3] * 255)
    return rgb.astype(np.uint8)[None]


def _usable(points: np.ndarray) -> bool:
    """A KDE needs a few points that are not all on a line."""
    if points.shape[-1] < 5:
        return False
    return np.ptp(np.atleast_2d(points), axis=1).min() > 0


def _kde(points: np.ndarray):
    from scipy.stats import gaussian_kde

    try:
        return gaussian_kde(points)
    except (np.linalg.LinAlgError, ValueError):  # singular covariance
        return None


def _span(data: dict, column: int, points: int) -> np.ndarray | None:
    """An evaluation grid covering each class's central 99 % (a rare class is not clipped by the
    range of a common one)."""
    ranges = [np.percentile(d[:, column], [0.5, 99.5]) for d in data.values() if len(d)]
    if not ranges:
        return None
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    pad = 0.15 * max(hi - lo, 1e-6)  # room for the KDE's tails
    return np.linspace(lo - pad, hi + pad, points)


def patch_kde(path: Path, plot_data: dict, summary: dict, *, title: str = "") -> Path:
    """2-D KDE contours of normal vs abnormal patches in (logerror, logvar), then 1-D KDEs of
    logerror, logvar and combined. `plot_data[class]` is (n, 3): the three scores per patch;
    `summary` is the set's JSON result (counts, Spearman rhos, KLs for the titles)."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    data = {name: np.asarray(plot_data.get(name, np.zeros((0, 3))), float) for name, _ in CLASSES}
    data = {name: d[np.isfinite(d).all(axis=1)] for name, d in data.items()}
    ax, drawn = axes[0], False
    gx, gy = _span(data, 0, 80), _span(data, 1, 80)
    for name, colour in CLASSES:
        pts = data[name][:, :2].T
        kde = _kde(pts) if gx is not None and _usable(pts) else None
        if kde is None:
            continue
        xx, yy = np.meshgrid(gx, gy)
        zz = kde(np.vstack([xx.ravel(), yy.ravel()])).reshape(xx.shape)
        ax.contour(xx, yy, zz, levels=6, colors=colour, linewidths=1.0)
        ax.plot([], [], color=colour, label=f"{name} ({summary.get(f'{name}_patches', 0):,})")
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
    else:
        _note(ax, "too few normal/abnormal patches for a KDE")
    ax.set_xlabel(SCORE_LABELS[0])
    ax.set_ylabel(SCORE_LABELS[1])
    kl = (summary.get("kl") or {}).get("2d")
    ax.set_title("2-D KDE" + ("" if kl is None else f", KL(abnormal||normal) = {kl:.3g}"))

    spearman = summary.get("spearman") or {}
    for i, (score, label) in enumerate(zip(("logerror", "logvar", "combined"), SCORE_LABELS)):
        ax, drawn, grid = axes[i + 1], False, _span(data, i, 200)
        for name, colour in CLASSES:
            pts = data[name][:, i]
            kde = _kde(pts) if grid is not None and _usable(pts[None]) else None
            if kde is not None:
                ax.plot(grid, kde(grid), color=colour, label=name)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            _note(ax, "too few patches")
        rho = (spearman.get(score) or {}).get("rho")
        ax.set_title(f"{score}" + ("" if rho is None else f" (Spearman rho {rho:.3f})"))
        ax.set_xlabel(label)
        ax.set_ylabel("density")
    fig.suptitle(f"{title}: normal (lesion < 10 %) vs abnormal (> 90 %) patches")
    return save(fig, path, dpi=100)
