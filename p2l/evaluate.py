"""Evaluate a workdir's checkpoint on the configured test sets (spec §5, §6, §7).

For each volume: lesion maps (p2l.scoring: heatmap, median filter, brain mask) -> metrics at every
threshold policy of `p2l.thresholds.policies` (oracle, validation-tuned, healthy quantile).
The healthy threshold is taken on healthy IXI volumes (the validation fold by default)
post-processed like the test volumes — the reference computed it on unfiltered heatmaps (spec
§8.14); `eval.healthy_postprocess=False` restores that.

Bounded memory (README, "Evaluation at scale"): every set is read, scored and reduced one volume
at a time (p2l.eval_stream); a test volume leaves a metrics row, a healthy or validation volume a
histogram on a fixed grid (p2l.score_histograms), from which the stored thresholds are read
within the tolerance stated there. Nothing here grows with the number of volumes but the rows.

Protocols (p2l.protocols): the validation-tuned Dice is reported on the test set minus the
validation subjects ("behrendt"), everything else on the whole test CSV ("reference").

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
    eval_stream,
    eval_tensorboard,
    figures,
    healthy_fpr,
    metrics,
    protocols,
    results_summary,
    thresholds,
    train_state,
)
from p2l import score_histograms as sh
from p2l.atomic_write import write_json_atomic, write_text_atomic
from p2l.errors import ConfigError
from p2l.scoring import Scorer


def my_indices(n_volumes: int, limit: int) -> list[int]:
    """This process's share (round-robin, p2l.parallel) of the first `limit` volume indices
    (all when limit is 0): indices, never volumes, so nothing is read that another process reads."""
    n = min(n_volumes, limit) if limit else n_volumes
    return list(range(jax.process_index(), n, jax.process_count()))


def _scored(config, scorer, builds, part: str, limit: int, reduce, desc: str, **kw):
    """(number of this process's volumes, iterator of reduce(volume, scored) in volume order)."""
    indices = my_indices(len(builds.subject_ids(part)), limit)
    stream = eval_stream.scored(scorer, builds.volumes(part, indices), reduce,
                                workers=eval_stream.resolve_workers(config.eval), **kw)  # fmt: skip
    return len(indices), tqdm(stream, total=len(indices), desc=desc, unit="vol")


def _merged(histogram: sh.Histogram) -> sh.Histogram:
    # Every process's small histogram, not its voxels (p2l.score_histograms).
    from p2l import parallel

    return sh.Histogram.merged(parallel.gather_objects(histogram.sparse()))


def healthy_threshold(config, scorer: Scorer, builds) -> tuple[float, int]:
    """The q-th percentile of healthy in-brain scores, from their merged histogram."""
    ev = config.eval

    def reduce(rec, sv):
        return sh.volume_counts(sv.score[rec.mask > 0], name=rec.subject_id)

    histogram = sh.Histogram()
    desc = f"healthy IXI ({ev.healthy_split})"
    _, stream = _scored(config, scorer, builds, ev.healthy_split, ev.max_healthy_volumes, reduce,
                        desc, filtered=ev.healthy_postprocess)  # fmt: skip
    for counts in stream:
        histogram.add(counts)
    histogram = _merged(histogram)
    if histogram.volumes == 0:
        raise ConfigError("eval.healthy_split", f"{ev.healthy_split!r} has no volumes")
    return sh.quantile(histogram.counts, ev.healthy_quantile), histogram.volumes


def validation_threshold(config, scorer: Scorer, builds, dataset: str) -> tuple[float | None, int]:
    """Threshold tuned on the dataset's lesion validation split (pooled Dice, spec §7), or None
    without one; from the merged histograms of all and of lesion voxels."""
    part = f"{dataset.lower()}_val"
    if not builds.has(part):
        return None, 0

    def reduce(rec, sv):
        seg = rec.seg if rec.seg is not None else np.zeros(sv.score.shape, np.uint8)
        return sh.volume_counts_with_lesion(sv.score, seg, name=rec.subject_id)

    histogram = sh.Histogram(columns=2)
    _, stream = _scored(config, scorer, builds, part, config.eval.max_volumes, reduce,
                        f"{dataset} validation")  # fmt: skip
    for counts in stream:
        histogram.add(counts)
    histogram = _merged(histogram)
    if histogram.volumes == 0:
        return None, 0
    return sh.best_dice_threshold(histogram.counts), histogram.volumes


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


def _volume_result(config, dataset, fixed, excluded_ids, with_figure, rec, sv):
    """Metrics row of one test volume (a worker thread), and its figure data when kept."""
    if rec.seg is None:
        raise ConfigError("test_sets", f"{dataset} volumes have no segmentation")
    excluded = rec.subject_id in excluded_ids
    if excluded:  # a validation subject: no validation-tuned number on it (p2l.protocols)
        fixed = {k: v for k, v in fixed.items() if k != thresholds.VALIDATION}
    row = {"dataset": dataset, "subject_id": rec.subject_id, protocols.VALIDATION_SUBJECT: excluded}
    row.update(
        metrics.volume_metrics(
            sv.score,
            rec.seg,
            rec.mask,
            fixed,
            min_component_voxels=config.eval.min_component_voxels,
            name=rec.subject_id,
        )
    )
    brain = rec.mask > 0
    lesion = brain & (rec.seg > 0)
    # The spec's AUROC/AUPRC count every voxel (spec §6), background too, where the score is 0
    # and which is easy to rank below lesions; these count the brain alone.
    if lesion.any() and not lesion[brain].all():
        row["auroc_brain"] = metrics.auroc(sv.score[brain], rec.seg[brain] > 0, name=rec.subject_id)
        row["auprc_brain"] = metrics.auprc(sv.score[brain], rec.seg[brain] > 0, name=rec.subject_id)
    # Do lesion voxels score higher than the rest of the brain? (the paper's premise)
    row["score_lesion_mean"] = float(sv.score[lesion].mean()) if lesion.any() else np.nan
    row["score_normal_brain_mean"] = float(sv.score[brain & ~lesion].mean())
    row["patches_evaluated"] = sv.patches_evaluated
    kept = None
    if with_figure(rec.subject_id):
        thr = figure_threshold(fixed)
        density = (np.log(sv.maps["error"][brain] + 1e-10), sv.maps["logvar"][brain],
                   rec.seg[brain] > 0)  # fmt: skip
        kept = (rec, sv.score, thr, density)
    return row, kept


def evaluate_set(config, scorer: Scorer, builds, dataset: str, policy_thresholds, out: Path,
                 excluded_ids=frozenset()):  # fmt: skip
    """Per-volume rows of a test set (all processes', in volume order); writes CSV and figures.

    `excluded_ids`: validation subjects, scored without the validation policy (p2l.protocols)."""
    ev = config.eval
    split = dataset.lower()
    fixed = {k: v for k, v in policy_thresholds.items() if v is not None}
    ids = builds.subject_ids(split)
    figure_ids = set(ids[: ev.num_figures])

    def reduce(rec, sv):
        return _volume_result(config, dataset, fixed, excluded_ids, figure_ids.__contains__,
                              rec, sv)  # fmt: skip

    rows, density = [], {"err": [], "var": [], "lesion": []}
    _, stream = _scored(config, scorer, builds, split, ev.max_volumes, reduce, f"{dataset} test")
    t0 = time.perf_counter()
    for row, kept in stream:
        # Pipelined: the time from the previous volume's result to this one's.
        row["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows.append(row)
        if kept is not None:
            rec, score, thr, (err, var, les) = kept
            figures.overlay(
                out / f"{split}_{rec.subject_id}_overlay.png",
                rec.image,
                score,
                rec.mask,
                rec.seg,
                None if thr is None else thresholds.predict(score, thr) & (rec.mask > 0),
                title=f"{dataset} {rec.subject_id}: Dice[oracle] {row['dice[oracle]']:.3f}, "
                f"AUPRC {row['auprc']:.3f}",
            )
            density["err"].append(err)
            density["var"].append(var)
            density["lesion"].append(les)
            del kept, rec, score
    # Per-volume rows of all processes, in volume order; written once, by process 0.
    from p2l import parallel

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


def healthy_test(config, scorer: Scorer, builds, stored: dict, out: Path) -> dict:
    """Flagged fraction of held-out healthy brains at every stored threshold (p2l.healthy_fpr);
    writes `<split>_healthy_volumes.csv`."""
    split = config.eval.healthy_test_split

    def reduce(rec, sv):
        return healthy_fpr.volume_row(rec.subject_id, sv.score, rec.mask, stored)

    _, stream = _scored(config, scorer, builds, split, config.eval.max_healthy_volumes, reduce,
                        f"healthy IXI ({split})",
                        filtered=config.eval.healthy_postprocess)  # fmt: skip
    from p2l import parallel

    rows = [r for share in parallel.gather_objects(list(stream)) for r in share]
    if jax.process_index() == 0:
        write_text_atomic(out / f"{split}_healthy_volumes.csv", _csv_text(rows))
    return {"split": split, **healthy_fpr.summarise(rows, stored)}


def uncertainty_report(config, model, variables, builds, out: Path, writer, step: int) -> dict:
    """results/uncertainty/ (p2l.uncertainty): calibration on the held-out healthy volumes (the
    healthy test split when set, else the healthy threshold's split; neither is trained on) and
    the patch-level analysis of every test set. Process 0 alone, over every volume."""
    from p2l import uncertainty

    ev = config.eval
    healthy = ev.get("healthy_test_split") or ev.healthy_split

    def volumes(part: str, limit: int):
        n = len(builds.subject_ids(part))
        return builds.volumes(part, range(min(n, limit) if limit else n))

    result = uncertainty.run(
        config, model, variables, volumes(healthy, ev.max_healthy_volumes),
        {d: volumes(d.lower(), ev.max_volumes) for d in config.test_sets},
        out / "uncertainty", writer, step,
    )  # fmt: skip
    return {"healthy_split": healthy, "folder": str(out / "uncertainty"),
            "scalars": uncertainty.scalars(result)}  # fmt: skip


def excluded_subjects(builds, dataset: str) -> set[str]:
    """Test subjects of `dataset` that are also in its validation CSV (p2l.protocols)."""
    part = f"{dataset.lower()}_val"
    if not builds.has(part):
        return set()
    return protocols.validation_subjects(builds.subject_ids(dataset.lower()),
                                         builds.subject_ids(part))  # fmt: skip


def evaluate(config, workdir: str | Path) -> dict:
    """Evaluates the latest checkpoint of `workdir`; returns (and writes) the summary."""
    from p2l import input_pipeline  # the tfds build (TensorFlow): scoring stays free of it

    config_check.check_paths(config)
    workdir = Path(workdir)
    out = workdir / "results"
    # Before hours of heatmaps: a read-only or full results folder stops here, in one line.
    # 100 MB: a nominal size for the CSVs, summary and figures of a run.
    disk_check.check_writable(out, 100 * 10**6, "evaluation")
    model, variables, step = train_state.restore_variables(config, workdir)
    builds = input_pipeline.build_dataset(config)
    scorer = Scorer(config, model, variables)
    t_start = time.perf_counter()
    healthy_name = thresholds.healthy_policy_name(config.eval.healthy_quantile)
    healthy, n_healthy = healthy_threshold(config, scorer, builds)
    summary = {
        "workdir": str(workdir),
        "name": config.name,
        "modality": config.modality,
        "fold": config.fold,
        "seed": config.seed,
        "checkpoint_step": step,
        "devices": [str(d) for d in jax.devices()],
        "eval": config.eval.to_dict(),
        "thresholds": {
            healthy_name: {
                "value": healthy,
                "volumes": n_healthy,
                "bin_width": sh.bin_width(healthy),
            }
        },  # fmt: skip
        "sets": {},
    }
    for dataset in config.test_sets:
        val_thr, n_val = validation_threshold(config, scorer, builds, dataset)
        summary["thresholds"][f"{thresholds.VALIDATION}[{dataset}]"] = {
            "value": val_thr,
            "volumes": n_val,
            "bin_width": None if val_thr is None else sh.bin_width(val_thr),
        }
        stored = {thresholds.VALIDATION: val_thr, healthy_name: healthy}
        policy = {p.name: stored[p.name] for p in thresholds.policies(config.eval.healthy_quantile)
                  if not p.per_volume}  # fmt: skip
        excluded = excluded_subjects(builds, dataset) if val_thr is not None else set()
        rows = evaluate_set(config, scorer, builds, dataset, policy, out, excluded)
        summary["sets"][dataset] = {
            "volumes": len(rows),
            "metrics": results_summary.aggregate_by_protocol(rows),
            "protocols": protocols.describe(
                rows, healthy_name, None if val_thr is None else n_val
            ),  # fmt: skip
        }
    if config.eval.get("healthy_test_split"):
        stored = {k: v["value"] for k, v in summary["thresholds"].items() if v["value"] is not None}
        summary["healthy_test"] = healthy_test(config, scorer, builds, stored, out)
    writer = eval_tensorboard.open_writer(workdir) if jax.process_index() == 0 else None
    if config.eval.get("uncertainty_report") and writer is not None:
        summary["uncertainty"] = uncertainty_report(config, model, variables, builds, out,
                                                    writer, step)  # fmt: skip
    summary["seconds"] = time.perf_counter() - t_start
    summary["processes"] = jax.process_count()
    if writer is not None:
        write_json_atomic(out / "summary.json", results_summary.json_safe(summary))
        eval_tensorboard.write(writer, step, summary, sorted(out.glob("*_overlay.png")))
        writer.close()
    return summary
