"""Patch2Loc fused with the DAE end to end on the embedded default: both trained briefly, one
evaluation scoring every detector, `make tables` rows per detector, detection with a DAE run."""

import json

import nibabel as nib
import numpy as np
import pytest

from experiments import dae_demo
from p2l import detect, evaluate, fusion, results_summary, train
from p2l.config_file import set_dotted
from p2l.errors import DataError
from p2l.tools import tables
from tests.conftest import demo_config

pytestmark = pytest.mark.slow  # trains two small models

DETECTORS = ["patch2loc", "dae", "fused[product]", "fused[zsum]", "fused[gate]"]


def dae_config(small_demo, **overrides):
    config = dae_demo.get_config("tiny")
    config.data_root = str(small_demo / "data")
    config.splits_dir = str(small_demo / "splits")
    config.tfds_dir = str(small_demo / "tfds")
    for key, value in overrides.items():
        set_dotted(config, key, value)
    return config


@pytest.fixture(scope="module")
def fused(small_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dae = dae_config(small_demo, num_steps=4, checkpoint_every=4, log_every=2, eval_every=4)
    train.train_and_evaluate(dae, root / "dae")
    config = demo_config(small_demo, num_steps=4, checkpoint_every=4, log_every=2, eval_every=4)
    config.eval.stride = 4
    config.eval.max_volumes = 2
    config.eval.max_healthy_volumes = 2
    config.eval.num_figures = 1
    config.eval.pixel_workdir = str(root / "dae")
    train.train_and_evaluate(config, root / "p2l")
    summary = evaluate.evaluate(config, root / "p2l")
    return config, root, summary


def test_one_evaluation_scores_every_detector_side_by_side(fused):
    config, root, summary = fused
    results = root / "p2l" / "results"
    on_disk = json.loads((results / "summary.json").read_text())
    assert list(summary["detectors"]) == DETECTORS and on_disk["detector"] == "patch2loc"
    assert set(on_disk["detectors"]) == set(DETECTORS)
    # The run's own numbers stay where they were before fusion existed.
    assert on_disk["sets"] == on_disk["detectors"]["patch2loc"]["sets"]
    params = on_disk["fusion"]["params"]
    assert params["p2l_std"] > 0 and params["pixel_std"] > 0 and params["weight"] == 0.5
    assert params["p2l_threshold"] == on_disk["thresholds"]["healthy_q98"]["value"]
    assert on_disk["fusion"]["pixel_run"]["step"] == 4
    for name in DETECTORS:
        res = on_disk["detectors"][name]
        assert res["sets"]["Synth"]["volumes"] == 2, name
        assert set(res["thresholds"]) == {"healthy_q98", "validation[Synth]"}, name
        assert 0.0 <= res["sets"]["Synth"]["metrics"]["auroc"]["mean"] <= 1.0, name
    rows = (results / "synth_volumes.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * len(DETECTORS) and ",detector," in "," + rows[0] + ","
    assert len(list(results.glob("synth_*_detectors.png"))) == 1
    text = results_summary.format_summary(summary)
    for name in DETECTORS:
        assert f"| Synth | {name} | 2 |" in text
    collected, _ = tables.collect(root)
    markdown, _ = tables.render(collected)
    for name in DETECTORS:
        assert f"| demo · {name} | Synth | 1 |" in markdown


def test_the_dae_run_evaluates_alone_too(fused, small_demo):
    _, root, _ = fused
    dae = dae_config(small_demo, num_steps=4)
    dae.eval.stride = 4
    dae.eval.max_volumes = 1
    dae.eval.max_healthy_volumes = 1
    summary = evaluate.evaluate(dae, root / "dae")
    assert summary["detector"] == "dae" and list(summary["detectors"]) == ["dae"]
    assert "uncertainty" not in summary
    assert summary["sets"]["Synth"]["volumes"] == 1


def test_detect_with_a_dae_run_writes_the_fused_map_on_the_input_grid(fused, small_demo, tmp_path):
    config, root, summary = fused
    scan = sorted((small_demo / "data" / "Test" / "Synth" / "t2").glob("*.nii.gz"))[0]
    mask = str(scan).replace("/t2/", "/mask/").replace("_t2.", "_mask.")
    for rule in fusion.RULES:
        args = detect.parse_args(
            ["--workdir", str(root / "p2l"), "--input", str(scan), "--modality", "t2",
             "--brain-mask", mask, "--output", str(tmp_path / rule / "case"), "--stride", "4",
             "--dae-workdir", str(root / "dae"), "--fusion", rule]
        )  # fmt: skip
        written = detect.detect(args)
        src = nib.load(scan)
        for name in ("score", "dae", "fused", "fused_mask", "mask"):
            img = nib.load(written[name])
            assert img.shape == src.shape, (rule, name)
            np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
        fused_mask = np.asarray(nib.load(written["fused_mask"]).dataobj)
        assert set(np.unique(fused_mask)) <= {0, 1}
    # A DAE folder that is not a trained run is named in one line.
    args = detect.parse_args(
        ["--workdir", str(root / "p2l"), "--input", str(scan), "--modality", "t2",
         "--brain-mask", mask, "--output", str(tmp_path / "x" / "case"), "--stride", "4",
         "--dae-workdir", str(tmp_path / "missing"), "--fusion", "gate"]
    )  # fmt: skip
    with pytest.raises(DataError, match="missing: not a trained DAE run folder"):
        detect.detect(args)
