"""The stored thresholds of an evaluation, for every detector it scores (spec §5.6, §7).

- Healthy quantile: the q-th percentile of in-brain scores of healthy IXI volumes
  (`eval.healthy_split`), from merged fixed-grid histograms (p2l.score_histograms).
- Validation-tuned: the pooled-Dice threshold on a lesion set's validation split.

With fusion (p2l.fused_scoring) the healthy volumes are scored once. That pass gives Patch2Loc's
and the pixel detector's histograms and the in-brain moments that fix the fusion parameters
(p2l.fusion.FusionParams); each volume's in-brain values of both maps go to a cache file on disk
(8 bytes per brain voxel), from which the fused maps' healthy histograms are then made without
scoring again. Host memory stays that of a few volumes; the cache is deleted at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from p2l import eval_stream, fusion
from p2l import score_histograms as sh
from p2l.errors import ConfigError


def my_indices(n_volumes: int, limit: int) -> list[int]:
    """This process's share (round-robin, p2l.parallel) of the first `limit` volume indices
    (all when limit is 0): indices, never volumes, so nothing is read that another process reads."""
    n = min(n_volumes, limit) if limit else n_volumes
    return list(range(jax.process_index(), n, jax.process_count()))


def scored(config, scorer, builds, part: str, limit: int, reduce, desc: str, **kw):
    """(number of this process's volumes, iterator of reduce(volume, scored) in volume order)."""
    indices = my_indices(len(builds.subject_ids(part)), limit)
    stream = eval_stream.scored(scorer, builds.volumes(part, indices), reduce,
                                workers=eval_stream.resolve_workers(config.eval), **kw)  # fmt: skip
    return len(indices), tqdm(stream, total=len(indices), desc=desc, unit="vol")


def merged(histogram: sh.Histogram) -> sh.Histogram:
    # Every process's small histogram, not its voxels (p2l.score_histograms).
    from p2l import parallel

    return sh.Histogram.merged(parallel.gather_objects(histogram.sparse()))


def _merged_moments(moments: fusion.HealthyMoments) -> fusion.HealthyMoments:
    from p2l import parallel

    total = fusion.HealthyMoments()
    for count, mean, m2 in parallel.gather_objects((moments.count, moments.mean, moments.m2)):
        total.merge(count, mean, m2)
    return total


def healthy_thresholds(
    config, opened, builds, cache_root: Path
) -> tuple[dict, int, dict | None, dict]:
    """({detector: healthy-quantile threshold}, healthy volumes, fusion parameters or None,
    the healthy reference of `healthy_reference`).

    Sets `opened.scorer.params` when the run fuses, so later passes carry the fused maps."""
    ev = config.eval
    fusing = opened.fused
    base = opened.scorer.detectors(fused=False) if fusing else opened.names
    cache = Path(tempfile.mkdtemp(prefix=".fusion_cache_", dir=cache_root)) if fusing else None
    primary_key = opened.names[opened.primary]
    per_volume: list[dict] = []  # the primary detector's statistics of each healthy volume

    def reduce(rec, sv):
        brain = rec.mask > 0
        counts = {d: sh.volume_counts(sv.maps[k][brain], name=rec.subject_id)
                  for d, k in base.items()}  # fmt: skip
        stats = volume_statistics(sv.maps, primary_key, brain)
        stats["counts"] = _sparse(counts[opened.primary])
        if not fusing:
            return counts, None, stats
        both = np.stack([sv.maps[k][brain] for k in base.values()]).astype(np.float32)
        return counts, both, stats

    histograms = {d: sh.Histogram() for d in base}
    moments = {d: fusion.HealthyMoments() for d in base}
    desc = f"healthy IXI ({ev.healthy_split})"
    try:
        _, stream = scored(config, opened.scorer, builds, ev.healthy_split,
                           ev.max_healthy_volumes, reduce, desc,
                           filtered=ev.healthy_postprocess)  # fmt: skip
        for i, (counts, both, stats) in enumerate(stream):
            per_volume.append(stats)
            for d, c in counts.items():
                histograms[d].add(c)
            if both is not None:
                for d, values in zip(base, both):
                    moments[d].add(values)
                np.save(cache / f"{i}.npy", both)
        histograms = {d: merged(h) for d, h in histograms.items()}
        n = next(iter(histograms.values())).volumes
        if n == 0:
            raise ConfigError("eval.healthy_split", f"{ev.healthy_split!r} has no volumes")
        thresholds = {d: sh.quantile(h.counts, ev.healthy_quantile) for d, h in histograms.items()}
        reference = healthy_reference(per_volume, thresholds[opened.primary])
        if not fusing:
            return thresholds, n, None, reference
        p2l_name, pixel_name = list(base)
        p2l_m, pixel_m = _merged_moments(moments[p2l_name]), _merged_moments(moments[pixel_name])
        # The gate opens above Patch2Loc's healthy quantile: the threshold's by default.
        gate_q = float(ev.get("fusion_gate_quantile", 0) or ev.healthy_quantile)
        params = fusion.FusionParams(
            p2l_mean=p2l_m.mean, p2l_std=p2l_m.std, pixel_mean=pixel_m.mean,
            pixel_std=pixel_m.std, p2l_threshold=sh.quantile(histograms[p2l_name].counts, gate_q),
            weight=float(ev.get("fusion_weight", 0.5)),
        )  # fmt: skip
        opened.scorer.params = params
        fused = {fusion.detector_name(r): sh.Histogram() for r in opened.scorer.rules}
        for path in sorted(cache.glob("*.npy")):
            p2l_values, pixel_values = np.load(path)
            for rule in opened.scorer.rules:
                values = fusion.fuse(rule, p2l_values, pixel_values, None, params)
                fused[fusion.detector_name(rule)].add(sh.volume_counts(values, name=path.name))
        for d, h in fused.items():
            thresholds[d] = sh.quantile(merged(h).counts, ev.healthy_quantile)
        return thresholds, n, params.to_dict(), reference
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


def volume_statistics(maps: dict, score_key: str, brain: np.ndarray) -> dict:
    """A volume's in-brain statistics that p2l.detect compares with the healthy reference: the
    mean score and, for Patch2Loc, the mean predicted log-variance (high on unfamiliar tissue)."""
    stats = {"mean_score": float(np.mean(maps[score_key][brain]))}
    if "logvar" in maps:
        stats["mean_logvar"] = float(np.mean(maps["logvar"][brain]))
    return stats


def _sparse(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bins = np.flatnonzero(counts)
    return bins.astype(np.int32), counts[bins]


def healthy_reference(per_volume: list[dict], threshold: float) -> dict:
    """Range of the primary detector's per-volume statistics over every process's healthy
    volumes: min, max, mean and std of the mean score, mean log-variance and the fraction of
    brain above the healthy threshold (summary["healthy_reference"], p2l.detect_report's
    out-of-distribution check). Kilobytes per volume (sparse histograms), gathered once."""
    from p2l import parallel

    rows = [r for part in parallel.gather_objects(per_volume) for r in part]
    values: dict[str, list[float]] = {}
    above_bin = sh.bin_index(np.asarray([threshold], np.float32))[0]
    for row in rows:
        bins, counts = row["counts"]
        total = int(counts.sum())
        values.setdefault("fraction_above", []).append(
            float(counts[bins > above_bin].sum()) / max(total, 1)
        )
        for key in ("mean_score", "mean_logvar"):
            if key in row:
                values.setdefault(key, []).append(row[key])
    summary = {
        key: {"min": float(np.min(v)), "max": float(np.max(v)), "mean": float(np.mean(v)),
              "std": float(np.std(v))}
        for key, v in values.items()
    }  # fmt: skip
    return {"volumes": len(rows), "threshold": float(threshold), "statistics": summary}


def validation_thresholds(config, opened, builds, dataset: str) -> tuple[dict, int]:
    """({detector: threshold tuned on the dataset's lesion validation split (pooled Dice, spec
    §7)}, volumes); ({}, 0) without a validation split."""
    part = f"{dataset.lower()}_val"
    if not builds.has(part):
        return {}, 0

    def reduce(rec, sv):
        seg = rec.seg if rec.seg is not None else np.zeros(rec.mask.shape, np.uint8)
        return {d: sh.volume_counts_with_lesion(sv.maps[k], seg, name=rec.subject_id)
                for d, k in opened.names.items()}  # fmt: skip

    histograms = {d: sh.Histogram(columns=2) for d in opened.names}
    _, stream = scored(config, opened.scorer, builds, part, config.eval.max_volumes, reduce,
                       f"{dataset} validation")  # fmt: skip
    for counts in stream:
        for d, c in counts.items():
            histograms[d].add(c)
    histograms = {d: merged(h) for d, h in histograms.items()}
    n = next(iter(histograms.values())).volumes
    if n == 0:
        return {}, 0
    return {d: sh.best_dice_threshold(h.counts) for d, h in histograms.items()}, n
