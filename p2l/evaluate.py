"""Evaluate a workdir's checkpoint on the configured test sets (spec §5, §6).

For each volume: lesion maps (p2l.scoring: heatmap, median filter, brain mask) -> metrics at every
threshold policy of `p2l.thresholds.policies` (oracle, validation-tuned, healthy quantile).
The healthy threshold is taken on healthy IXI volumes (the validation fold by default)
post-processed like the test volumes — the reference computed it on unfiltered heatmaps (spec
§8.14); `eval.healthy_postprocess=False` restores that.

Writes into <workdir>/results/: `<set>_volumes.csv` (one row per volume), `summary.json`, and
figures (`<set>_<subject>_overlay.png`, `<set>_error_vs_variance.png`).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from p2l import (
    config_check,
    disk_check,
    figures,
    metrics,
    normalization,
    orientation,
    parallel,
    results_summary,
    splits,
    thresholds,
    train_state,
)
from p2l.atomic_write import write_json_atomic, write_text_atomic
from p2l.errors import ConfigError
from p2l.scoring import Scorer


def _eval_volumes(builder, split: str):
    # The prepared volumes live in the tfds slice build; only reading them needs TensorFlow,
    # so it is imported here and scoring stays free of it (p2l.detect).
    from p2l import input_pipeline

    return input_pipeline.read_eval_volumes(builder, split)


def _limit(iterable, n: int):
    for i, item in enumerate(iterable):
        if n and i >= n:
            return
        yield item


def _my_share(iterable, limit: int) -> list:
    """This process's share of the first `limit` items (all items when limit is 0)."""
    return parallel.process_share(list(_limit(iterable, limit)))


def healthy_threshold(config, scorer: Scorer, builder) -> tuple[float, int]:
    ev = config.eval
    records = _my_share(_eval_volumes(builder, ev.healthy_split), ev.max_healthy_volumes)
    values = []
    stream = scorer.stream(records, filtered=ev.healthy_postprocess)
    for rec, sv in tqdm(stream, total=len(records), desc=f"healthy IXI ({ev.healthy_split})",
                        unit="vol"):  # fmt: skip
        values.append(sv.score[rec.mask > 0])
    values = [v for share in parallel.gather_objects(values) for v in share]
    return thresholds.healthy_quantile_threshold(values, q=ev.healthy_quantile), len(values)


def validation_threshold(
    config, scorer: Scorer, dataset: str, axcodes=None
) -> tuple[float | None, int]:
    """Threshold tuned on the dataset's lesion validation split, or None without one.

    `axcodes`: the run's training orientation (p2l.orientation); each volume is brought to it,
    as the slice build does for the test volumes."""
    path = splits.dataset_csv_path(config.splits_dir, dataset, part="val")
    if not Path(path).exists():
        return None, 0
    rows = splits.read_test_split(
        config.splits_dir, dataset, config.modality, config.data_root, part="val"
    )
    rows = _my_share(rows, config.eval.max_volumes)
    subjects = (
        normalization.load_subject(
            row.image_path,
            row.mask_path,
            row.seg_path,
            modality=config.modality,
            subject_id=row.subject_id,
            target_shape=tuple(config.data.image_shape),
            expected_spacing=config.data.expected_spacing,
            orientation=axcodes,
            check_oblique=False,  # the dataset's own volumes, as the slice build reads them
        )
        for row in rows
    )
    compact = []
    for subject, sv in tqdm(scorer.stream(subjects), total=len(rows),
                            desc=f"{dataset} validation", unit="vol"):  # fmt: skip
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


def _csv_text(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def figure_threshold(policy_thresholds: dict) -> float | None:
    """The stored threshold shown in figures: the first fixed policy that has a value."""
    return next((v for v in policy_thresholds.values() if v is not None), None)


def evaluate_set(config, scorer: Scorer, builder, dataset: str, policy_thresholds, out: Path):
    rows, density = [], {"err": [], "var": [], "lesion": []}
    ev = config.eval
    split = dataset.lower()
    records = _my_share(_eval_volumes(builder, split), ev.max_volumes)
    for rec in records:
        if rec.seg is None:
            raise ConfigError("test_sets", f"{dataset} volumes have no segmentation")
    fixed = {k: v for k, v in policy_thresholds.items() if v is not None}
    thr = figure_threshold(policy_thresholds)
    t0 = time.perf_counter()
    stream = tqdm(scorer.stream(records), total=len(records), desc=f"{dataset} test", unit="vol")
    for i, (rec, sv) in enumerate(stream):
        row = {"dataset": dataset, "subject_id": rec.subject_id}
        row.update(
            metrics.volume_metrics(
                sv.score,
                rec.seg,
                rec.mask,
                fixed,
                min_component_voxels=ev.min_component_voxels,
                name=rec.subject_id,
            )
        )
        brain = rec.mask > 0
        lesion = brain & (rec.seg > 0)
        # Do lesion voxels score higher than the rest of the brain? (the paper's premise)
        row["score_lesion_mean"] = float(sv.score[lesion].mean()) if lesion.any() else np.nan
        row["score_normal_brain_mean"] = float(sv.score[brain & ~lesion].mean())
        row["patches_evaluated"] = sv.patches_evaluated
        # Pipelined: the time from the previous volume's result to this one's.
        row["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows.append(row)
        if i < ev.num_figures:
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
            density["err"].append(np.log(sv.maps["error"][brain] + 1e-10))
            density["var"].append(sv.maps["logvar"][brain])
            density["lesion"].append(rec.seg[brain] > 0)
    # Per-volume rows of all processes, in volume order; written once, by process 0.
    shares = parallel.gather_objects(rows)
    rows = [r for i in range(max(map(len, shares), default=0)) for s in shares if i < len(s)
            for r in [s[i]]]  # fmt: skip
    if jax.process_index() == 0:
        write_text_atomic(out / f"{split}_volumes.csv", _csv_text(rows))
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
    from p2l import input_pipeline  # the tfds build (TensorFlow), see _eval_volumes

    config_check.check_paths(config)
    workdir = Path(workdir)
    out = workdir / "results"
    # Before hours of heatmaps: a read-only or full results folder stops here, in one line.
    # 100 MB: a nominal size for the CSVs, summary and figures of a run.
    disk_check.check_writable(out, 100 * 10**6, "evaluation")
    model, variables, step = train_state.restore_variables(config, workdir)
    builder = input_pipeline.build_dataset(config)
    scorer = Scorer(config, model, variables)
    t_start = time.perf_counter()
    healthy_name = thresholds.healthy_policy_name(config.eval.healthy_quantile)
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
        "thresholds": {healthy_name: {"value": healthy, "volumes": n_healthy}},
        "sets": {},
    }
    space = orientation.run_space(workdir, config)
    axcodes = None if space is None else space["axcodes"]
    for dataset in config.test_sets:
        val_thr, n_val = validation_threshold(config, scorer, dataset, axcodes)
        summary["thresholds"][f"{thresholds.VALIDATION}[{dataset}]"] = {
            "value": val_thr,
            "volumes": n_val,
        }
        stored = {thresholds.VALIDATION: val_thr, healthy_name: healthy}
        policy = {p.name: stored[p.name] for p in thresholds.policies(config.eval.healthy_quantile)
                  if not p.per_volume}  # fmt: skip
        rows = evaluate_set(config, scorer, builder, dataset, policy, out)
        summary["sets"][dataset] = {
            "volumes": len(rows),
            "metrics": results_summary.aggregate(rows),
        }
    summary["seconds"] = time.perf_counter() - t_start
    summary["processes"] = jax.process_count()
    if jax.process_index() == 0:
        write_json_atomic(out / "summary.json", results_summary.json_safe(summary))
    return summary
