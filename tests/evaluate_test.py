"""End-to-end evaluation on the embedded default: heatmaps, thresholds, metrics, figures, tables,
single-scan detection in the input grid, and the errors users can hit."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from p2l import (
    detect,
    evaluate,
    input_pipeline,
    results_summary,
    score_histograms,
    thresholds,
    train,
    train_state,
)
from p2l.errors import ConfigError, DataError
from p2l.scoring import Scorer
from p2l.tools import tables
from tests.conftest import demo_config

# Trains and evaluates a demo model once for the module (about a minute and a half).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(small_demo, tmp_path_factory):
    """A briefly trained demo model and its evaluation (shared by the tests below)."""
    workdir = tmp_path_factory.mktemp("run")
    config = demo_config(small_demo, num_steps=6, checkpoint_every=6, log_every=3, eval_every=6)
    config.eval.stride = 4
    config.eval.max_volumes = 2
    config.eval.max_healthy_volumes = 1
    config.eval.num_figures = 1
    train.train_and_evaluate(config, workdir)
    summary = evaluate.evaluate(config, workdir)
    return config, workdir, summary


def test_evaluation_writes_results_figures_and_labelled_thresholds(trained):
    config, workdir, summary = trained
    results = workdir / "results"
    on_disk = json.loads((results / "summary.json").read_text())
    assert on_disk["sets"]["Synth"]["volumes"] == 2
    assert set(on_disk["thresholds"]) == {"healthy_q98", "validation[Synth]"}
    assert on_disk["thresholds"]["validation[Synth]"]["volumes"] == 2
    m = on_disk["sets"]["Synth"]["metrics"]
    for key in ("dice[oracle]", "dice[validation]", "dice[healthy_q98]", "auroc", "auprc"):
        assert key in m and m[key]["n"] == 2
    assert 0.0 <= m["auroc"]["mean"] <= 1.0
    rows = (results / "synth_volumes.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("detector,dataset,subject_id")
    assert (results / "synth_error_vs_variance.png").stat().st_size > 0
    assert len(list(results.glob("synth_*_overlay.png"))) == 1
    text = results_summary.format_summary(summary)
    assert "Dice (oracle)" in text and "| Synth | 2 |" in text
    # The demo's Synth_val subjects are not in Synth_test: nothing is left out.
    assert on_disk["sets"]["Synth"]["protocols"] == {
        "reference": {"policies": ["oracle", "healthy_q98"], "threshold_free": True,
                      "volumes": 2},
        "behrendt": {"policies": ["validation"], "volumes": 2, "excluded_validation_subjects": 0,
                     "validation_volumes": 2},
    }  # fmt: skip
    assert "behrendt protocol: 0 validation subject(s) left out" in text


def test_streamed_thresholds_match_the_exact_functions(trained):
    """The summary's thresholds (histograms, p2l.score_histograms) against p2l.thresholds' exact
    functions on the same scored volumes of the demo model, within the stated tolerance."""
    config, workdir, summary = trained
    model, variables, _ = train_state.restore_variables(config, workdir)
    builds = input_pipeline.build_dataset(config)
    scorer = Scorer(config, model, variables)
    ev = config.eval
    healthy = [sv.score[rec.mask > 0] for rec, sv in scorer.stream(
        list(builds.volumes(ev.healthy_split, range(ev.max_healthy_volumes))))]  # fmt: skip
    exact = thresholds.healthy_quantile_threshold(healthy, q=ev.healthy_quantile)
    streamed = summary["thresholds"]["healthy_q98"]["value"]
    assert abs(streamed - exact) <= 2**-11 * abs(exact)
    val = [(sv.score, rec.seg, rec.mask) for rec, sv in scorer.stream(
        list(builds.volumes("synth_val", range(ev.max_volumes))))]  # fmt: skip
    exact_val = thresholds.validation_threshold(*map(list, zip(*val)))
    streamed_val = summary["thresholds"]["validation[Synth]"]["value"]
    assert abs(streamed_val - exact_val) <= 2 * score_histograms.bin_width(exact_val)

    def pooled_dice(t):
        tp = sum(np.count_nonzero(thresholds.predict(s, t) & (g > 0)) for s, g, _ in val)
        pred = sum(np.count_nonzero(thresholds.predict(s, t)) for s, _, _ in val)
        return 2 * tp / (pred + sum(np.count_nonzero(g) for _, g, _ in val))

    assert pooled_dice(streamed_val) >= pooled_dice(exact_val) - 1e-3


def test_tables_collect_runs_and_flag_missing(trained, tmp_path):
    _, workdir, _ = trained
    root = tmp_path / "runs"
    shutil.copytree(workdir, root / "fold0", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(workdir, root / "fold1", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.rmtree(root / "fold1" / "results")
    collected, problems = tables.collect(root)
    assert len(collected["runs"]["demo"]["Synth"]) == 1
    assert any("fold1" in p and "summary" in p for p in problems)
    markdown, csv_text = tables.render(collected)
    assert "| demo | Synth | 1 |" in markdown and "Dice oracle" in markdown
    assert csv_text.splitlines()[1].startswith("demo,Synth,1,")


def test_detect_writes_outputs_in_the_input_grid(trained, small_demo, tmp_path):
    config, workdir, _ = trained
    scan = sorted((small_demo / "data" / "Test" / "Synth" / "t2").glob("*.nii.gz"))[0]
    args = detect.parse_args(
        ["--workdir", str(workdir), "--input", str(scan), "--modality", "t2",
         "--output", str(tmp_path / "out" / "case"), "--stride", "4"]
    )  # fmt: skip
    written = detect.detect(args)
    src = nib.load(scan)
    for name in ("score", "error", "logvar", "mask"):
        img = nib.load(written[name])
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    mask = np.asarray(nib.load(written["mask"]).dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    assert written["overlay"].stat().st_size > 0


def test_detect_refuses_the_wrong_modality(trained, small_demo, tmp_path):
    _, workdir, _ = trained
    scan = sorted((small_demo / "data" / "Test" / "Synth" / "t1").glob("*.nii.gz"))[0]
    args = detect.parse_args(
        ["--workdir", str(workdir), "--input", str(scan), "--modality", "t1",
         "--output", str(tmp_path / "x")]
    )  # fmt: skip
    with pytest.raises(ConfigError, match="trained on T2"):
        detect.detect(args)


def test_detect_refuses_a_scan_and_mask_on_different_grids(trained, small_demo, tmp_path):
    _, workdir, _ = trained
    scan = sorted((small_demo / "data" / "Test" / "Synth" / "t2").glob("*.nii.gz"))[0]
    img = nib.load(scan)
    shifted = nib.Nifti1Image((np.asarray(img.dataobj)[1:] > 0).astype(np.float32), img.affine)
    nib.save(shifted, tmp_path / "mask.nii.gz")
    args = detect.parse_args(
        ["--workdir", str(workdir), "--input", str(scan), "--modality", "t2",
         "--brain-mask", str(tmp_path / "mask.nii.gz"), "--output", str(tmp_path / "x")]
    )  # fmt: skip
    with pytest.raises(DataError, match="shape"):
        detect.detect(args)


def test_checkpoint_from_another_config_is_refused(trained):
    config, workdir, _ = trained
    other = config.copy_and_resolve_references()
    other.data.image_shape = (192, 192, 100)
    with pytest.raises(ConfigError, match="image_shape"):
        train_state.restore_variables(other, workdir)


def test_no_checkpoint_gives_a_clear_error(tmp_path, small_demo):
    with pytest.raises(DataError, match="no checkpoint found"):
        train_state.restore_variables(demo_config(small_demo), tmp_path)


def test_detect_without_brain_mask_refuses_unstripped_scan(trained, tmp_path):
    _, workdir, _ = trained
    head = np.random.default_rng(0).random((40, 40, 30)).astype(np.float32) + 1
    nib.save(nib.Nifti1Image(head, np.eye(4) * 2), tmp_path / "head.nii.gz")
    args = detect.parse_args(
        ["--workdir", str(workdir), "--input", str(tmp_path / "head.nii.gz"), "--modality", "t2",
         "--output", str(tmp_path / "x")]
    )  # fmt: skip
    with pytest.raises(DataError, match="skull-stripped"):
        detect.detect(args)
