"""Evaluation in the run's TensorBoard, beside training's scalars (<workdir>/tensorboard).

At the evaluated checkpoint's step: the headline metrics of every test set (mean over volumes),
the in-brain AUROC/AUPRC, the thresholds, the healthy test set's flagged fractions, and the
overlay figures as images. Only process 0 writes (like p2l.run_log).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2l.results_summary import headline

# Per-volume keys worth a curve besides the headline ones (Dice per policy, AUPRC, AUROC).
_EXTRA = ("auroc_brain", "auprc_brain", "score_lesion_mean", "score_normal_brain_mean")


def open_writer(workdir: Path):
    """The run's TensorBoard writer (clu, as training's)."""
    from clu import metric_writers

    return metric_writers.SummaryWriter(str(Path(workdir) / "tensorboard"))


def scalars(summary: dict) -> dict[str, float]:
    """Flat {tag: value} of an evaluation summary (p2l.evaluate), NaN-free."""
    keys = [k for k, _ in headline(summary["eval"]["healthy_quantile"])] + list(_EXTRA)
    out = {}
    for dataset, res in summary["sets"].items():
        for key in keys:
            mean = res["metrics"].get(key, {}).get("mean")
            if mean is not None and np.isfinite(mean):
                out[f"eval/{dataset}/{key}"] = float(mean)
    for name, t in summary["thresholds"].items():
        if t["value"] is not None:
            out[f"eval/threshold/{name}"] = float(t["value"])
    # The other detectors of a fused evaluation (p2l.detectors), under their names.
    primary = summary.get("detector")
    for detector, result in (summary.get("detectors") or {}).items():
        if detector == primary:
            continue
        for dataset, res in result["sets"].items():
            for key in keys:
                mean = res["metrics"].get(key, {}).get("mean")
                if mean is not None and np.isfinite(mean):
                    out[f"eval/{detector}/{dataset}/{key}"] = float(mean)
    for name, t in summary.get("healthy_test", {}).get("thresholds", {}).items():
        if t["pooled_fraction"] is not None:
            out[f"eval/healthy_test_brain_above/{name}"] = float(t["pooled_fraction"])
    return out


def _rgb(png: Path) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return image[..., :3]


def write(writer, step: int, summary: dict, pngs: list[Path]) -> None:
    """Scalars of `summary` and the figures `pngs` at `step`."""
    writer.write_scalars(int(step), scalars(summary))
    if pngs:
        writer.write_images(int(step), {f"eval/{p.stem}": _rgb(p)[None] for p in sorted(pngs)})
    writer.flush()
