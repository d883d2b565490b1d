"""The overlay PNG of `p2l.detect`: the axial slices with the most flagged voxels, on the input.

Drawn in the scan's closest RAS orientation (whatever its storage order), so slices are axial and
the image is upright with the patient's right on the left, as radiological viewers show it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

SLICES = 3


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ornt = nib.orientations.io_orientation(np.asarray(affine))
    return nib.orientations.apply_orientation(array, ornt)


def overlay(path: Path, image, score, brain, mask, affine, *, title: str = "") -> Path:
    """Rows: the SLICES axial slices with most flagged voxels (most brain when none is flagged);
    columns: scan, score over the brain, flagged outline."""
    image, score = _canonical(image, affine), _canonical(score, affine)
    brain, mask = _canonical(brain, affine) > 0, _canonical(mask, affine) > 0
    per_slice = mask.sum(axis=(0, 1)) if mask.any() else brain.sum(axis=(0, 1))
    zs = sorted(np.argsort(per_slice)[::-1][:SLICES].tolist())
    inside = score[brain]
    vmin, vmax = np.percentile(inside, [2, 99.5]) if inside.size else (0.0, 1.0)
    fig, axes = plt.subplots(len(zs), 3, figsize=(10, 3.4 * len(zs)), squeeze=False)
    for row, z in zip(axes, zs, strict=True):
        # RAS: x to the right of the array's first axis; rot90 puts anterior up, right on the left.
        img = np.rot90(image[:, :, z])
        heat = np.ma.masked_where(~np.rot90(brain[:, :, z]), np.rot90(score[:, :, z]))
        row[0].imshow(img, cmap="gray")
        row[0].set_title(f"scan, axial slice {z}")
        row[1].imshow(img, cmap="gray")
        shown = row[1].imshow(heat, cmap="inferno", alpha=0.75, vmin=vmin, vmax=vmax)
        row[1].set_title("anomaly score")
        fig.colorbar(shown, ax=row[1], fraction=0.046, pad=0.04)
        row[2].imshow(img, cmap="gray")
        flagged = np.rot90(mask[:, :, z])
        if flagged.any():
            row[2].contour(flagged, levels=[0.5], colors="red", linewidths=1.0)
        row[2].set_title(f"flagged ({int(mask[:, :, z].sum())} voxels)")
        for ax in row:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
