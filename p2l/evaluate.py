"""Evaluate a workdir's checkpoint on the configured test sets (spec §5, §6).

For each volume: heatmap (p2l.heatmaps) -> median filter and brain mask (p2l.postprocess) ->
metrics at every threshold policy (p2l.metrics). Thresholds:
- "oracle": the reference's per-volume bisection against the volume's own ground truth
  (spec §5.6, an upper bound, what the reference reports as "Supervised Dice");
- "validation": one threshold per dataset tuned on its lesion validation split, when the
  splits folder has `<Dataset>_val.csv` (the behrendt/ format);
- "healthy_q98": the 98th percentile of in-brain scores of healthy IXI volumes (the IXI
  validation fold by default), post-processed like the test volumes — the reference computed
  it on unfiltered heatmaps (spec §8.14); `eval.healthy_postprocess=False` restores that.

Writes into <workdir>/results/: `<set>_volumes.csv` (one row per volume), `summary.json`, and
figures (`<set>_<subject>_overlay.png`, `<set>_error_vs_variance.png`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from p2l import (
    config_check,
    figures,
    heatmaps,
    input_pipeline,
    metrics,
    normalization,
    parallel,
    patches,
    postprocess,
    run_log,
    splits,
    thresholds,
    train,
)
from p2l.errors import ConfigError


@dataclass
class ScoredVolume:
    subject_id: str
    image: np.ndarray
    mask: np.ndarray
    seg: np.ndarray | None
    score: np.ndarray  # post-processed (filtered, masked) score
    raw: heatmaps.HeatmapResult


class Scorer:
    """Heatmap + post-processing of one volume with the config's settings."""

    def __init__(self, config, model, variables):
        self.config = config
        self.model = model
        self.variables = heatmaps.local_variables(variables)
        self.patch = patches.patch_size_for(
            config.data.image_shape[0], config.sampling.patch_fraction
        )

    def __call__(self, subject_id, image, mask, seg, *, filtered: bool = True) -> ScoredVolume:
        ev = self.config.eval
        median = ev.median_size if filtered else 0
        # Patches that cannot reach the masked, filtered result are skipped (p2l.heatmaps).
        region = postprocess.influence_region(mask, max(median, 1)) if median else mask > 0
        raw = heatmaps.volume_heatmap(
            self.model,
            self.variables,
            image,
            patch=self.patch,
            stride=ev.stride,
            batch_size=ev.batch_size,
            region=region,
            dtype=ev.dtype,
            variant=ev.variant,
        )
        work_mask = mask
        if ev.erode_mask_iterations:
            work_mask = postprocess.erode_brain_mask(mask, ev.erode_mask_iterations)
        score = postprocess.postprocess(
            raw.score, work_mask, median_size=median or None, name=subject_id
        )
        return ScoredVolume(subject_id, image, work_mask, seg, score, raw)


def _limit(iterable, n: int):
    for i, item in enumerate(iterable):
        if n and i >= n:
            return
        yield item


def healthy_threshold(config, scorer: Scorer, builder) -> tuple[float, int]:
    ev = config.eval
    values = []
    records = _my_share(
        input_pipeline.read_eval_volumes(builder, ev.healthy_split), ev.max_healthy_volumes
    )
    for rec in tqdm(records, desc=f"healthy IXI ({ev.healthy_split})", unit="vol"):
        sv = scorer(rec.subject_id, rec.image, rec.mask, None, filtered=ev.healthy_postprocess)
        values.append(sv.score[rec.mask > 0])
    values = [v for share in parallel.gather_objects(values) for v in share]
    return thresholds.healthy_quantile_threshold(values, q=ev.healthy_quantile), len(values)


def validation_threshold(config, scorer: Scorer, dataset: str) -> tuple[float | None, int]:
    """Threshold tuned on the dataset's lesion validation split, or None without one."""
    path = splits.dataset_csv_path(config.splits_dir, dataset, part="val")
    if not Path(path).exists():
        return None, 0
    rows = splits.read_test_split(
        config.splits_dir, dataset, config.modality, config.data_root, part="val"
    )
    compact = []
    for row in tqdm(
        _my_share(rows, config.eval.max_volumes), desc=f"{dataset} validation", unit="vol"
    ):
        subject = normalization.load_subject(
            row.image_path,
            row.mask_path,
            row.seg_path,
            modality=config.modality,
            subject_id=row.subject_id,
            target_shape=tuple(config.data.image_shape),
            expected_spacing=config.data.expected_spacing,
        )
        sv = scorer(subject.subject_id, subject.image, subject.mask, subject.seg)
        seg = subject.seg if subject.seg is not None else np.zeros(sv.score.shape, np.uint8)
        compact.append(_compact_volume(sv.score, seg > 0, subject.mask > 0))
    volumes = [_expand_volume(c) for share in parallel.gather_objects(compact) for c in share]
    if not volumes:
        return None, 0
    scores, segs, masks = (list(x) for x in zip(*volumes))
    return thresholds.validation_threshold(scores, segs, masks), len(scores)


def _compact_volume(score, seg, brain):
    """What the threshold search needs of a volume, small enough to gather across processes.

    Outside the brain mask the post-processed score is exactly 0 (spec §5.5), so only in-brain
    scores, the lesion flags and the outside-brain lesion count are kept. The expanded volume
    is a permutation of the original voxels, and the threshold search only counts voxels.
    """
    assert not np.any(score[~brain]), "post-processed scores must be 0 outside the brain"
    return (score[brain], seg[brain], int((~brain).sum()), int(seg[~brain].sum()))


def _expand_volume(compact):
    inside_score, inside_seg, n_out, n_out_lesion = compact
    score = np.concatenate([inside_score, np.zeros(n_out, inside_score.dtype)])
    seg = np.concatenate([inside_seg, np.arange(n_out) < n_out_lesion])
    brain = np.concatenate([np.ones(inside_seg.size, bool), np.zeros(n_out, bool)])
    return score, seg, brain


def _my_share(iterable, limit: int) -> list:
    """This process's share of the first `limit` items (all items when limit is 0)."""
    return parallel.process_share(list(_limit(iterable, limit)))


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def evaluate_set(config, scorer: Scorer, builder, dataset: str, policy_thresholds, out: Path):
    rows, density = [], {"err": [], "var": [], "lesion": []}
    ev = config.eval
    split = dataset.lower()
    records = _my_share(input_pipeline.read_eval_volumes(builder, split), ev.max_volumes)
    for i, rec in enumerate(tqdm(records, desc=f"{dataset} test", unit="vol")):
        if rec.seg is None:
            raise ConfigError("test_sets", f"{dataset} volumes have no segmentation")
        t0 = time.perf_counter()
        sv = scorer(rec.subject_id, rec.image, rec.mask, rec.seg)
        row = {"dataset": dataset, "subject_id": rec.subject_id}
        row.update(
            metrics.volume_metrics(
                sv.score,
                rec.seg,
                rec.mask,
                {k: v for k, v in policy_thresholds.items() if v is not None},
                min_component_voxels=ev.min_component_voxels,
                name=rec.subject_id,
            )
        )
        brain = rec.mask > 0
        lesion = brain & (rec.seg > 0)
        # Do lesion voxels score higher than the rest of the brain? (the paper's premise)
        row["score_lesion_mean"] = float(sv.score[lesion].mean()) if lesion.any() else np.nan
        row["score_normal_brain_mean"] = float(sv.score[brain & ~lesion].mean())
        row["patches_evaluated"] = sv.raw.patches_evaluated
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if i < ev.num_figures:
            thr = next((policy_thresholds[k] for k in ("validation", "healthy_q98")
                        if policy_thresholds.get(k) is not None), None)  # fmt: skip
            figures.overlay(
                out / f"{split}_{rec.subject_id}_overlay.png",
                rec.image,
                sv.score,
                rec.mask,
                rec.seg,
                None if thr is None else thresholds.predict(sv.score, thr) & brain,
                title=f"{dataset} {rec.subject_id}: Dice[oracle] {row['dice[oracle]']:.3f}, "
                f"AUPRC {row['auprc']:.3f}",
            )
            density["err"].append(np.log(sv.raw.error[brain] + 1e-10))
            density["var"].append(sv.raw.logvar[brain])
            density["lesion"].append(rec.seg[brain] > 0)
    # Per-volume rows of all processes, in volume order; written once, by process 0.
    shares = parallel.gather_objects(rows)
    rows = [r for i in range(max(map(len, shares), default=0)) for s in shares if i < len(s)
            for r in [s[i]]]  # fmt: skip
    if jax.process_index() == 0:
        _write_csv(out / f"{split}_volumes.csv", rows)
    if density["err"]:
        figures.error_variance_density(
            out / f"{split}_error_vs_variance.png",
            np.concatenate(density["err"]),
            np.concatenate(density["var"]),
            np.concatenate(density["lesion"]),
            title=f"{dataset}: normal vs lesion voxels",
        )
    return rows


def evaluate(config, workdir: str | Path) -> dict:
    """Evaluates the latest checkpoint of `workdir`; returns (and writes) the summary."""
    config_check.check_paths(config)
    workdir = Path(workdir)
    model, variables, step = train.restore_variables(config, workdir)
    out = workdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    builder = input_pipeline.build_dataset(config)
    scorer = Scorer(config, model, variables)
    t_start = time.perf_counter()
    healthy, n_healthy = healthy_threshold(config, scorer, builder)
    summary = {
        "workdir": str(workdir),
        "name": config.name,
        "modality": config.modality,
        "fold": config.fold,
        "seed": config.seed,
        "checkpoint_step": step,
        "devices": [str(d) for d in jax.devices()],
        "eval": config.eval.to_dict(),
        "thresholds": {"healthy_q98": {"value": healthy, "volumes": n_healthy}},
        "sets": {},
    }
    for dataset in config.test_sets:
        val_thr, n_val = validation_threshold(config, scorer, dataset)
        summary["thresholds"][f"validation[{dataset}]"] = {"value": val_thr, "volumes": n_val}
        policy = {"healthy_q98": healthy, "validation": val_thr}
        rows = evaluate_set(config, scorer, builder, dataset, policy, out)
        summary["sets"][dataset] = {
            "volumes": len(rows),
            "metrics": metrics.aggregate(rows),
        }
    summary["seconds"] = time.perf_counter() - t_start
    summary["processes"] = jax.process_count()
    if jax.process_index() == 0:
        run_log.write_json_atomic(out / "summary.json", _finite(summary))
    return summary


def _finite(tree):
    """JSON has no NaN/inf: write them as null (the counts say how many there were)."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    if isinstance(tree, np.generic):
        return _finite(tree.item())
    return tree


HEADLINE = (
    ("dice[oracle]", "Dice (oracle)"),
    ("dice[validation]", "Dice (val-tuned)"),
    ("dice[healthy_q98]", "Dice (healthy q98)"),
    ("auprc", "AUPRC"),
    ("auroc", "AUROC"),
)


def format_summary(summary: dict) -> str:
    """A small Markdown table of the headline metrics (mean ± std over volumes, in %)."""
    lines = [
        f"{summary['name']} fold {summary['fold']} seed {summary['seed']} "
        f"(checkpoint step {summary['checkpoint_step']})",
        "| set | volumes | " + " | ".join(h for _, h in HEADLINE) + " |",
        "|---|---|" + "---|" * len(HEADLINE),
    ]
    for name, res in summary["sets"].items():
        cells = []
        for key, _ in HEADLINE:
            m = res["metrics"].get(key)
            if not m or m.get("mean") is None:
                cells.append("n/a")
            else:
                cells.append(f"{100 * m['mean']:.2f} ± {100 * (m.get('std') or 0):.2f}")
        lines.append(f"| {name} | {res['volumes']} | " + " | ".join(cells) + " |")
    thr = ", ".join(
        f"{k}={v['value']:.4g}" for k, v in summary["thresholds"].items() if v["value"] is not None
    )
    lines.append(f"thresholds: {thr}")
    return "\n".join(lines)
