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

from p2l import (
    config_check,
    detector_figures,
    detectors,
    disk_check,
    eval_tensorboard,
    figures,
    healthy_fpr,
    metrics,
    protocols,
    results_summary,
    thresholds,
)
from p2l import score_histograms as sh
from p2l.atomic_write import write_json_atomic, write_text_atomic
from p2l.errors import ConfigError
from p2l.eval_thresholds import healthy_thresholds, scored, validation_thresholds


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


def _detector_row(config, dataset, fixed, excluded, rec, score) -> dict:
    """Metrics of one detector's post-processed map of one test volume."""
    if excluded:  # a validation subject: no validation-tuned number on it (p2l.protocols)
        fixed = {k: v for k, v in fixed.items() if k != thresholds.VALIDATION}
    row = {"dataset": dataset, "subject_id": rec.subject_id, protocols.VALIDATION_SUBJECT: excluded}
    row.update(metrics.volume_metrics(score, rec.seg, rec.mask, fixed,
                                      min_component_voxels=config.eval.min_component_voxels,
                                      name=rec.subject_id))  # fmt: skip
    brain = rec.mask > 0
    lesion = brain & (rec.seg > 0)
    # The spec's AUROC/AUPRC count every voxel (spec §6), background too, where the score is 0
    # and which is easy to rank below lesions; these count the brain alone.
    if lesion.any() and not lesion[brain].all():
        row["auroc_brain"] = metrics.auroc(score[brain], rec.seg[brain] > 0, name=rec.subject_id)
        row["auprc_brain"] = metrics.auprc(score[brain], rec.seg[brain] > 0, name=rec.subject_id)
    # Do lesion voxels score higher than the rest of the brain? (the paper's premise)
    row["score_lesion_mean"] = float(score[lesion].mean()) if lesion.any() else np.nan
    row["score_normal_brain_mean"] = float(score[brain & ~lesion].mean())
    return row


def _volume_result(config, dataset, fixed, excluded_ids, with_figure, opened, rec, sv):
    """Metrics rows of one test volume, one per detector (a worker thread), and its figure data
    when kept: the primary detector's full maps, and a 2-D slice of every detector's map."""
    if rec.seg is None:
        raise ConfigError("test_sets", f"{dataset} volumes have no segmentation")
    excluded = rec.subject_id in excluded_ids
    rows = {}
    for name, key in opened.names.items():
        row = _detector_row(config, dataset, fixed[name], excluded, rec, sv.maps[key])
        row["patches_evaluated"] = sv.patches_evaluated
        rows[name] = {"detector": name, **row}
    kept = None
    if with_figure(rec.subject_id):
        brain = rec.mask > 0
        thr = {name: figure_threshold(fixed[name]) for name in opened.names}
        primary = sv.maps[opened.names[opened.primary]]
        density = None
        if "error" in sv.maps:  # Patch2Loc's heatmap parts
            density = (np.log(sv.maps["error"][brain] + 1e-10), sv.maps["logvar"][brain],
                       rec.seg[brain] > 0)  # fmt: skip
        panels = None
        if len(opened.names) > 1:
            maps = {n: sv.maps[k] for n, k in opened.names.items()}
            preds = {n: thresholds.predict(m, thr[n]) & brain for n, m in maps.items()
                     if thr[n] is not None}  # fmt: skip
            panels = detector_figures.slice_panels(rec.image, rec.mask, rec.seg, maps, preds)
        kept = (rec, primary, thr[opened.primary], density, panels)
    return rows, kept


def _figures(out: Path, dataset: str, split: str, primary: str, rows: dict, kept, density):
    rec, score, thr, dens, panels = kept
    row = rows[primary]
    figures.overlay(
        out / f"{split}_{rec.subject_id}_overlay.png", rec.image, score, rec.mask, rec.seg,
        None if thr is None else thresholds.predict(score, thr) & (rec.mask > 0),
        title=f"{dataset} {rec.subject_id} ({primary}): Dice[oracle] {row['dice[oracle]']:.3f}, "
        f"AUPRC {row['auprc']:.3f}",
    )  # fmt: skip
    if panels is not None:
        notes = {n: f"AUPRC {r['auprc']:.3f}, Dice[oracle] {r['dice[oracle]']:.3f}"
                 for n, r in rows.items()}  # fmt: skip
        detector_figures.side_by_side(out / f"{split}_{rec.subject_id}_detectors.png", panels,
                                      title=f"{dataset} {rec.subject_id}", notes=notes)  # fmt: skip
    if dens is not None:
        for k, part in zip(("err", "var", "lesion"), dens):
            density[k].append(part)


def evaluate_set(config, opened, builds, dataset: str, policy_thresholds: dict, out: Path,
                 excluded_ids=frozenset()):  # fmt: skip
    """Per-volume rows of a test set (all processes', in volume order, one per detector and
    volume); writes `<set>_volumes.csv` (a `detector` column) and the figures.

    `policy_thresholds`: {detector: {policy: threshold}}. `excluded_ids`: validation subjects,
    scored without the validation policy (p2l.protocols)."""
    ev = config.eval
    split = dataset.lower()
    fixed = {d: {k: v for k, v in p.items() if v is not None} for d, p in policy_thresholds.items()}
    ids = builds.subject_ids(split)
    figure_ids = set(ids[: ev.num_figures])

    def reduce(rec, sv):
        return _volume_result(config, dataset, fixed, excluded_ids, figure_ids.__contains__,
                              opened, rec, sv)  # fmt: skip

    volumes, density = [], {"err": [], "var": [], "lesion": []}
    _, stream = scored(config, opened.scorer, builds, split, ev.max_volumes, reduce,
                       f"{dataset} test")  # fmt: skip
    t0 = time.perf_counter()
    for rows, kept in stream:
        # Pipelined: the time from the previous volume's result to this one's.
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for row in rows.values():
            row["seconds"] = seconds
        volumes.append(list(rows.values()))
        if kept is not None:
            _figures(out, dataset, split, opened.primary, rows, kept, density)
            del kept
    # Per-volume rows of all processes, in volume order; written once, by process 0.
    from p2l import parallel

    shares = parallel.gather_objects(volumes)
    rows = [r for i in range(max(map(len, shares), default=0)) for s in shares if i < len(s)
            for r in s[i]]  # fmt: skip
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


def healthy_test(config, opened, builds, stored: dict, out: Path) -> dict:
    """Flagged fraction of held-out healthy brains at every stored threshold of every detector
    (p2l.healthy_fpr); writes `<split>_healthy_volumes.csv`; {detector: summary}."""
    split = config.eval.healthy_test_split

    def reduce(rec, sv):
        return [{"detector": d, **healthy_fpr.volume_row(rec.subject_id, sv.maps[k], rec.mask,
                                                          stored[d])}
                for d, k in opened.names.items()]  # fmt: skip

    _, stream = scored(config, opened.scorer, builds, split, config.eval.max_healthy_volumes,
                       reduce, f"healthy IXI ({split})",
                       filtered=config.eval.healthy_postprocess)  # fmt: skip
    from p2l import parallel

    rows = [r for share in parallel.gather_objects(list(stream)) for vol in share for r in vol]
    if jax.process_index() == 0:
        write_text_atomic(out / f"{split}_healthy_volumes.csv", _csv_text(rows))
    return {d: {"split": split, **healthy_fpr.summarise([r for r in rows if r["detector"] == d],
                                                        stored[d])}
            for d in opened.names}  # fmt: skip


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


def _set_summary(rows: list[dict], healthy_name: str, n_val: int | None) -> dict:
    return {"volumes": len(rows), "metrics": results_summary.aggregate_by_protocol(rows),
            "protocols": protocols.describe(rows, healthy_name, n_val)}  # fmt: skip


def evaluate(config, workdir: str | Path) -> dict:
    """Evaluates the latest checkpoint of `workdir`; returns (and writes) the summary.

    Every detector of the run (p2l.detectors: the run's own; with `eval.pixel_workdir` also the
    DAE and the fusion rules) is scored on the same volumes in the same pass, with its own stored
    thresholds. summary["sets"] and summary["thresholds"] are the run's own detector's (as before
    fusion existed); summary["detectors"][name] holds every detector's."""
    from p2l import input_pipeline  # the tfds build (TensorFlow): scoring stays free of it

    config_check.check_paths(config)
    workdir = Path(workdir)
    out = workdir / "results"
    # Before hours of heatmaps: a read-only or full results folder stops here, in one line.
    # 100 MB: a nominal size for the CSVs, summary and figures of a run.
    disk_check.check_writable(out, 100 * 10**6, "evaluation")
    opened = detectors.open_run(config, workdir)
    builds = input_pipeline.build_dataset(config)
    t_start = time.perf_counter()
    healthy_name = thresholds.healthy_policy_name(config.eval.healthy_quantile)
    healthy, n_healthy, fusion_params, reference = healthy_thresholds(config, opened, builds, out)
    per_detector = {d: {"thresholds": {healthy_name: {
        "value": healthy[d], "volumes": n_healthy, "bin_width": sh.bin_width(healthy[d])}},
        "sets": {}} for d in opened.names}  # fmt: skip
    for dataset in config.test_sets:
        val_thr, n_val = validation_thresholds(config, opened, builds, dataset)
        policy = {}
        for d in opened.names:
            value = val_thr.get(d)
            per_detector[d]["thresholds"][f"{thresholds.VALIDATION}[{dataset}]"] = {
                "value": value, "volumes": n_val,
                "bin_width": None if value is None else sh.bin_width(value)}  # fmt: skip
            stored = {thresholds.VALIDATION: value, healthy_name: healthy[d]}
            policy[d] = {p.name: stored[p.name]
                         for p in thresholds.policies(config.eval.healthy_quantile)
                         if not p.per_volume}  # fmt: skip
        excluded = excluded_subjects(builds, dataset) if val_thr else set()
        rows = evaluate_set(config, opened, builds, dataset, policy, out, excluded)
        for d in opened.names:
            mine = [r for r in rows if r["detector"] == d]
            per_detector[d]["sets"][dataset] = _set_summary(mine, healthy_name,
                                                            n_val if val_thr else None)  # fmt: skip
    primary = per_detector[opened.primary]
    summary = {
        "workdir": str(workdir), "name": config.name, "modality": config.modality,
        "fold": config.fold, "seed": config.seed, "checkpoint_step": opened.step,
        "devices": [str(d) for d in jax.devices()], "eval": config.eval.to_dict(),
        "detector": opened.primary, "thresholds": primary["thresholds"], "sets": primary["sets"],
        "detectors": per_detector, "healthy_reference": reference,
    }  # fmt: skip
    if opened.fused:
        summary["fusion"] = {"rules": list(opened.scorer.rules), "params": fusion_params,
                             "pixel_run": opened.pixel}  # fmt: skip
    if config.eval.get("healthy_test_split"):
        stored = {d: {k: v["value"] for k, v in per_detector[d]["thresholds"].items()
                      if v["value"] is not None} for d in opened.names}  # fmt: skip
        tested = healthy_test(config, opened, builds, stored, out)
        for d, result in tested.items():
            per_detector[d]["healthy_test"] = result
        summary["healthy_test"] = tested[opened.primary]
    writer = eval_tensorboard.open_writer(workdir) if jax.process_index() == 0 else None
    report = config.eval.get("uncertainty_report") and opened.primary == "patch2loc"
    if report and writer is not None:
        summary["uncertainty"] = uncertainty_report(config, opened.model, opened.variables,
                                                    builds, out, writer, opened.step)  # fmt: skip
    summary["seconds"] = time.perf_counter() - t_start
    summary["processes"] = jax.process_count()
    if writer is not None:
        write_json_atomic(out / "summary.json", results_summary.json_safe(summary))
        eval_tensorboard.write(writer, opened.step, summary, sorted(out.glob("*_overlay.png")))
        writer.close()
    return summary
