"""Streaming evaluation without a model: protocols (validation subjects left out of the
validation policy), ordered multi-worker streaming, thresholds from histograms vs exact ones."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from p2l import (
    eval_thresholds,
    evaluate,
    fused_scoring,
    fusion,
    protocols,
    results_summary,
    thresholds,
)
from p2l import score_histograms as sh
from p2l.detectors import OpenedRun
from p2l.errors import ConfigError
from p2l.scoring import ScoredVolume
from tests.conftest import demo_config

SHAPE = (20, 18, 12)


@dataclass
class Record:  # the fields of p2l.slices_builder.VolumeRecord that evaluation reads
    image: np.ndarray
    mask: np.ndarray
    seg: np.ndarray | None
    subject_id: str
    num_slices: int = SHAPE[2]


def _record(subject_id: str, lesion: bool = True) -> Record:
    rng = np.random.default_rng(zlib.crc32(subject_id.encode()))
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    mask = ((grid**2).sum(0) < 0.8).astype(np.float32)
    seg = ((((grid - rng.uniform(-0.3, 0.3, 3)[:, None, None, None]) ** 2).sum(0) < 0.1) & (
        mask > 0
    )).astype(np.uint8) if lesion else np.zeros(SHAPE, np.uint8)  # fmt: skip
    image = (rng.normal(-2.0, 1.0, SHAPE) + 2.5 * seg).astype(np.float32)
    return Record(image, mask, seg, subject_id)


class FakeBuilds:
    """p2l.builds.Builds' interface over in-memory parts; counts the volumes read."""

    def __init__(self, parts: dict[str, list[Record]]):
        self.parts = parts
        self.read = 0

    def has(self, part):
        return part in self.parts

    def subject_ids(self, part):
        return [r.subject_id for r in self.parts[part]]

    def volumes(self, part, indices=None):
        for i in range(len(self.parts[part])) if indices is None else indices:
            self.read += 1
            yield self.parts[part][i]


class FakeScorer:
    """Scores a volume as its image masked to the brain (0 outside, as post-processed maps)."""

    def start(self, subject_id, image, mask, seg=None, *, filtered=True):
        score = (np.round(image, 2) * (mask > 0)).astype(np.float32)
        maps = {"score": score, "error": np.abs(image), "logvar": np.zeros_like(image)}

        class Pending:
            def result(self):
                return ScoredVolume(subject_id, image, mask, seg, maps, 0)

        return Pending()


def opened(scorer=None) -> OpenedRun:
    """A Patch2Loc-only run around a fake scorer."""
    return OpenedRun(scorer or FakeScorer(), {"patch2loc": "score"}, "patch2loc", None, {}, 0)


def by_policy(policy: dict) -> dict:
    return {"patch2loc": policy}


@pytest.fixture
def setup(small_config_dir):
    config = demo_config(small_config_dir)
    config.eval.num_figures = 1
    test = [_record(f"s{i}") for i in range(5)]
    val = [_record("v1"), test[2], _record("v2", lesion=False)]  # s2: in both CSVs
    healthy = [_record(f"h{i}", lesion=False) for i in range(3)]
    builds = FakeBuilds({"synth": test, "synth_val": val, "val": healthy})
    return config, builds


@pytest.fixture
def small_config_dir(tmp_path):
    return tmp_path / "demo"  # demo_config only records the paths


def test_validation_subjects_are_left_out_of_the_validation_policy(setup, tmp_path):
    config, builds = setup
    excluded = evaluate.excluded_subjects(builds, "Synth")
    assert excluded == {"s2"}
    val_thr, n_val = eval_thresholds.validation_thresholds(config, opened(), builds, "Synth")
    assert n_val == 3 and set(val_thr) == {"patch2loc"}
    policy = {thresholds.VALIDATION: val_thr["patch2loc"], "healthy_q98": 0.5}
    rows = evaluate.evaluate_set(config, opened(), builds, "Synth", by_policy(policy), tmp_path,
                                 excluded)  # fmt: skip
    assert {r["detector"] for r in rows} == {"patch2loc"}
    assert [r["subject_id"] for r in rows] == ["s0", "s1", "s2", "s3", "s4"]
    s2 = rows[2]
    assert s2[protocols.VALIDATION_SUBJECT] and "dice[validation]" not in s2
    assert "dice[healthy_q98]" in s2 and "dice[oracle]" in s2
    assert all("dice[validation]" in r for r in rows if r["subject_id"] != "s2")
    m = results_summary.aggregate_by_protocol(rows)
    assert m["dice[validation]"]["n"] == 4 and m["dice[validation]"]["n_nan"] == 0
    assert m["dice[oracle]"]["n"] == 5 and m["auroc"]["n"] == 5
    described = protocols.describe(rows, "healthy_q98", n_val)
    assert described == {
        "reference": {"policies": ["oracle", "healthy_q98"], "threshold_free": True,
                      "volumes": 5},
        "behrendt": {"policies": ["validation"], "volumes": 4, "excluded_validation_subjects": 1,
                     "validation_volumes": 3},
    }  # fmt: skip
    summary = {"name": "x", "fold": 0, "seed": 0, "checkpoint_step": 1, "eval": {},
               "thresholds": {}, "sets": {"Synth": {"volumes": 5, "metrics": m,
                                                    "protocols": described}}}  # fmt: skip
    text = results_summary.format_summary(json.loads(json.dumps(summary)))
    assert "validation on 4 (behrendt protocol: 1 validation subject(s) left out)" in text
    assert "Behrendt protocol" in results_summary.legend()
    assert (tmp_path / "synth_volumes.csv").read_text().count("\n") == 6
    assert len(list(tmp_path.glob("synth_*_overlay.png"))) == 1


def test_no_validation_csv_means_no_behrendt_numbers(setup):
    config, builds = setup
    del builds.parts["synth_val"]
    assert eval_thresholds.validation_thresholds(config, opened(), builds, "Synth") == ({}, 0)
    assert evaluate.excluded_subjects(builds, "Synth") == set()
    assert set(protocols.describe([], "healthy_q98", None)) == {"reference"}


@pytest.mark.parametrize("workers", [1, 3])
def test_streamed_thresholds_match_the_exact_functions(setup, workers, tmp_path):
    config, builds = setup
    config.eval.workers = workers
    scorer = FakeScorer()
    healthy, n, params, _ = eval_thresholds.healthy_thresholds(
        config, opened(scorer), builds, tmp_path
    )
    healthy = healthy["patch2loc"]
    assert params is None
    inside = [scorer.start(r.subject_id, r.image, r.mask).result().score[r.mask > 0]
              for r in builds.parts["val"]]  # fmt: skip
    exact = thresholds.healthy_quantile_threshold(inside, q=config.eval.healthy_quantile)
    assert n == 3 and abs(healthy - exact) <= sh.bin_width(exact)
    val_thr, _ = eval_thresholds.validation_thresholds(config, opened(scorer), builds, "Synth")
    val_thr = val_thr["patch2loc"]
    vols = [(scorer.start(r.subject_id, r.image, r.mask).result().score, r.seg, r.mask)
            for r in builds.parts["synth_val"]]  # fmt: skip
    exact_val = thresholds.validation_threshold(*map(list, zip(*vols)))
    assert abs(val_thr - exact_val) <= 2 * sh.bin_width(exact_val)


def test_limits_read_only_this_share_and_errors_reach_the_caller(setup, tmp_path):
    config, builds = setup
    config.eval.max_volumes = 2
    config.eval.workers = 2
    rows = evaluate.evaluate_set(config, opened(), builds, "Synth", by_policy({}), tmp_path)
    assert len(rows) == 2 and builds.read == 2
    builds.parts["synth"][1].seg = None
    with pytest.raises(ConfigError, match="no segmentation"):
        evaluate.evaluate_set(config, opened(), builds, "Synth", by_policy({}), tmp_path)


class FakePixelScorer:
    """A pixel-wise detector: |image| in the brain (0 outside), post-processed like a score."""

    def start(self, subject_id, image, mask, seg=None, *, filtered=True):
        maps = {"score": (np.abs(image) * (mask > 0)).astype(np.float32)}

        class Pending:
            def result(self):
                return ScoredVolume(subject_id, image, mask, seg, maps, 0)

        return Pending()


def fused_run(config) -> OpenedRun:
    fake = FakeScorer()
    fake.config = config
    scorer = fused_scoring.FusedScorer(fake, FakePixelScorer(), fusion.RULES)
    return OpenedRun(scorer, scorer.detectors(), "patch2loc", None, {}, 0)


def test_fused_evaluation_scores_every_detector_once_with_exact_healthy_fusion(setup, tmp_path):
    """One healthy pass fixes the fusion parameters and every detector's healthy threshold (the
    fused ones from the cached in-brain values); test rows come per detector."""
    config, builds = setup
    run = fused_run(config)
    healthy, n, params, _ = eval_thresholds.healthy_thresholds(config, run, builds, tmp_path)
    assert n == 3 and builds.read == 3  # scored once, not once per detector
    assert set(healthy) == {"patch2loc", "dae", "fused[product]", "fused[zsum]", "fused[gate]"}
    assert not list(tmp_path.glob(".fusion_cache_*"))  # the cache is removed
    vols = [run.scorer.start(r.subject_id, r.image, r.mask).result() for r in builds.parts["val"]]
    p2l_in = np.concatenate([v.score[v.mask > 0] for v in vols])
    pix_in = np.concatenate([v.maps["dae"][v.mask > 0] for v in vols])
    assert params["p2l_mean"] == pytest.approx(p2l_in.mean(), rel=1e-6)
    assert params["pixel_std"] == pytest.approx(pix_in.std(), rel=1e-6)
    assert params["p2l_threshold"] == healthy["patch2loc"]
    assert params["weight"] == 0.5
    # The fused maps of the same volumes, now that the parameters are set: thresholds match the
    # exact healthy quantile of each fused map within a histogram bin.
    for rule in fusion.RULES:
        name = fusion.detector_name(rule)
        inside = [v.maps[name][v.mask > 0] for v in vols]
        exact = thresholds.healthy_quantile_threshold(inside, q=config.eval.healthy_quantile)
        assert abs(healthy[name] - exact) <= sh.bin_width(exact) + 1e-12, rule
    val_thr, n_val = eval_thresholds.validation_thresholds(config, run, builds, "Synth")
    assert n_val == 3 and set(val_thr) == set(healthy)
    policy = {d: {thresholds.VALIDATION: val_thr[d], "healthy_q98": healthy[d]} for d in healthy}
    rows = evaluate.evaluate_set(config, run, builds, "Synth", policy, tmp_path)
    assert len(rows) == 5 * 5
    assert [r["detector"] for r in rows[:5]] == list(run.names)
    assert len(list(tmp_path.glob("synth_*_detectors.png"))) == 1
    # The DAE's row of a volume is the metrics of |image| in the brain.
    r = next(r for r in rows if r["detector"] == "dae" and r["subject_id"] == "s0")
    rec = builds.parts["synth"][0]
    brain = rec.mask > 0
    expected = np.abs(rec.image) * brain
    from p2l import metrics

    assert r["auroc_brain"] == pytest.approx(metrics.auroc(expected[brain], rec.seg[brain] > 0))


def test_the_gate_can_open_at_another_healthy_quantile(setup, tmp_path):
    config, builds = setup
    config.eval.fusion_gate_quantile = 50.0
    run = fused_run(config)
    healthy, _, params, _ = eval_thresholds.healthy_thresholds(config, run, builds, tmp_path)
    vols = [run.scorer.start(r.subject_id, r.image, r.mask).result() for r in builds.parts["val"]]
    median = thresholds.healthy_quantile_threshold([v.score[v.mask > 0] for v in vols], q=50.0)
    assert abs(params["p2l_threshold"] - median) <= sh.bin_width(median)
    assert params["p2l_threshold"] < healthy["patch2loc"]  # the q98 threshold is unchanged
