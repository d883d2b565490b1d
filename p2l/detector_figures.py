"""Side-by-side figure of every detector's map on one axial slice (Patch2Loc, the DAE, each fusion
rule): the scan with the ground truth, then one panel per detector, its map over the scan and its
thresholded prediction outlined. Only the 2-D slice is kept per volume, so figures cost nothing
that grows with the volume count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2l import figures
from p2l.figures import plt


def slice_panels(image, mask, seg, maps: dict, predictions: dict) -> dict:
    """The axial slice (most lesion, else most brain) of the image, mask, seg and every map."""
    z = figures.most_informative_slice(seg, mask)
    cut = lambda a: None if a is None else np.rot90(np.asarray(a)[:, :, z]).copy()  # noqa: E731
    return {"z": z, "image": cut(image), "mask": cut(mask > 0), "seg": cut(seg),
            "maps": {d: cut(m) for d, m in maps.items()},
            "predictions": {d: cut(p) for d, p in predictions.items()}}  # fmt: skip


def side_by_side(path: Path, panels: dict, *, title: str = "", notes: dict | None = None) -> Path:
    """One row: scan + truth, then each detector's in-brain map (2-99.5 % of its brain values)
    with its prediction (red) and the truth (green) outlined. `notes`: text under each title."""
    maps = panels["maps"]
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3.2 * (1 + len(maps)), 3.6))
    axes = np.atleast_1d(axes)
    img, brain, seg = panels["image"], panels["mask"], panels["seg"]
    axes[0].imshow(img, cmap="gray")
    if seg is not None and seg.any():
        axes[0].contour(seg > 0, levels=[0.5], colors="lime", linewidths=1.0)
    axes[0].set_title(f"scan, truth (slice {panels['z']})", fontsize=9)
    for ax, (name, heat) in zip(axes[1:], maps.items()):
        inside = heat[brain]
        vmin, vmax = np.percentile(inside, [2, 99.5]) if inside.size else (0.0, 1.0)
        ax.imshow(img, cmap="gray")
        ax.imshow(np.ma.masked_where(~brain, heat), cmap="inferno", alpha=0.75, vmin=vmin,
                  vmax=vmax)  # fmt: skip
        pred = panels["predictions"].get(name)
        if pred is not None and pred.any():
            ax.contour(pred, levels=[0.5], colors="red", linewidths=0.8)
        if seg is not None and seg.any():
            ax.contour(seg > 0, levels=[0.5], colors="lime", linewidths=0.6)
        note = (notes or {}).get(name)
        ax.set_title(name if note is None else f"{name}\n{note}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figures.save(fig, path)
