"""Pictures people look at: heatmap overlays and the error-vs-variance density plot.

Written atomically as PNG (matplotlib's Agg backend, no display needed).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from p2l.atomic_write import atomic_path  # noqa: E402


def save(fig, path: Path, dpi: int = 110) -> Path:
    """Writes `fig` as a PNG atomically and closes it."""
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def most_informative_slice(seg: np.ndarray | None, mask: np.ndarray) -> int:
    """Axial slice with the most lesion voxels, else the one with the most brain."""
    source = seg if seg is not None and seg.any() else (mask > 0)
    return int(np.argmax(source.reshape(-1, source.shape[-1]).sum(axis=0)))


def overlay(
    path: Path,
    image: np.ndarray,
    score: np.ndarray,
    mask: np.ndarray,
    seg: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    *,
    title: str = "",
    z: int | None = None,
) -> Path:
    """Three panels of one axial slice: scan, in-brain score over the scan, prediction vs truth.

    Ground truth is outlined in green, the thresholded prediction in red.
    """
    z = most_informative_slice(seg, mask) if z is None else z
    img = np.rot90(image[:, :, z])
    brain = np.rot90(mask[:, :, z] > 0)
    heat = np.ma.masked_where(~brain, np.rot90(score[:, :, z]))
    inside = score[mask > 0]
    vmin, vmax = np.percentile(inside, [2, 99.5]) if inside.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    axes[0].imshow(img, cmap="gray")
    axes[0].set_title(f"scan (axial slice {z})")
    axes[1].imshow(img, cmap="gray")
    im = axes[1].imshow(heat, cmap="inferno", alpha=0.75, vmin=vmin, vmax=vmax)
    axes[1].set_title("anomaly score")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(img, cmap="gray")
    handles = []
    if seg is not None and seg[:, :, z].any():
        axes[2].contour(np.rot90(seg[:, :, z] > 0), levels=[0.5], colors="lime", linewidths=1.2)
        handles.append(plt.Line2D([], [], color="lime", label="ground truth"))
    if prediction is not None and prediction[:, :, z].any():
        axes[2].contour(np.rot90(prediction[:, :, z]), levels=[0.5], colors="red", linewidths=1.0)
        handles.append(plt.Line2D([], [], color="red", label="prediction"))
    if handles:
        axes[2].legend(handles=handles, loc="lower right", fontsize=8)
    axes[2].set_title("prediction vs truth")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    save(fig, path)
    return Path(path)


def error_variance_density(
    path: Path,
    log_error: np.ndarray,
    log_variance: np.ndarray,
    lesion: np.ndarray,
    *,
    title: str = "",
    max_points: int = 4000,
    seed: int = 0,
) -> Path:
    """2-D densities of (log error, log variance) for normal and lesion voxels (paper's analysis).

    Arrays are 1-D over in-brain voxels; `lesion` is boolean. Each class is subsampled to
    `max_points` for the kernel density estimate.
    """
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, colour, sel in (("normal", "tab:blue", ~lesion), ("lesion", "tab:red", lesion)):
        idx = np.flatnonzero(sel)
        if idx.size < 10:
            continue
        idx = rng.choice(idx, size=min(max_points, idx.size), replace=False)
        pts = np.vstack([log_error[idx], log_variance[idx]])
        if np.ptp(pts, axis=1).min() <= 0:
            continue
        kde = gaussian_kde(pts)
        x = np.linspace(*np.percentile(log_error, [0.5, 99.5]), 80)
        y = np.linspace(*np.percentile(log_variance, [0.5, 99.5]), 80)
        xx, yy = np.meshgrid(x, y)
        zz = kde(np.vstack([xx.ravel(), yy.ravel()])).reshape(xx.shape)
        ax.contour(xx, yy, zz, levels=6, colors=colour, linewidths=1.0)
        ax.plot([], [], color=colour, label=f"{label} ({sel.sum():,} voxels)")
    ax.set_xlabel("log squared location error")
    ax.set_ylabel("mean predicted log-variance")
    ax.legend(fontsize=8)
    ax.set_title(title)
    save(fig, path)
    return Path(path)
