"""Which detectors a run scores (p2l.detectors) and the fusion keys' checks (p2l.config_check)."""

from __future__ import annotations

import json

import pytest

from experiments import dae_demo, demo
from p2l import config_check, detectors
from p2l.errors import ConfigError


def _write_run(folder, config):
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps({"config": config.to_dict()}, default=list))
    return folder


def test_the_dae_configs_train_the_dae_on_the_patch2loc_data():
    p2l, dae = demo.get_config(), dae_demo.get_config()
    assert config_check.method(p2l) == "patch2loc" and config_check.method(dae) == "dae"
    for key in detectors.SAME_INPUT_KEYS:
        assert detectors._get(p2l, key) == detectors._get(dae, key), key
    assert (dae.data_root, dae.splits_dir) == (p2l.data_root, p2l.splits_dir)
    assert dae.name == "demo_dae"
    # The faithful DAE (experiments/dae.py) before the demo's CPU shrinking.
    from experiments import dae as dae_base
    from experiments import t2

    faithful = dae_base.as_dae(t2.get_config(), "dae_t2")
    assert (faithful.dae.depth, faithful.dae.width, faithful.dae.noise_std,
            faithful.dae.noise_res) == (4, 64, 0.2, 16)  # fmt: skip
    assert (faithful.optim.learning_rate, faithful.sampling.slices_per_step) == (1e-4, 16)


def test_the_pixel_run_must_be_a_dae_on_the_same_grid(tmp_path):
    config = demo.get_config()
    dae_dir = _write_run(tmp_path / "dae", dae_demo.get_config())
    loaded = detectors.load_pixel_config(config, dae_dir)
    assert loaded.method == "dae" and loaded.eval.median_size == config.eval.median_size
    other = dae_demo.get_config()
    other.data.image_shape = (64, 64, 48)
    with pytest.raises(ConfigError, match="image_shape"):
        detectors.load_pixel_config(config, _write_run(tmp_path / "other", other))
    t1 = dae_demo.get_config()
    t1.modality = "t1"
    with pytest.raises(ConfigError, match="modality"):
        detectors.load_pixel_config(config, _write_run(tmp_path / "t1", t1))
    with pytest.raises(ConfigError, match="not a DAE run"):
        detectors.load_pixel_config(config, _write_run(tmp_path / "p2l", demo.get_config()))


def test_fusion_keys_are_checked_in_one_line(tmp_path):
    config = demo.get_config()
    config_check.check_fusion(config)  # the defaults
    config.eval.fusion = ("product", "mean")
    with pytest.raises(ConfigError, match="unknown fusion rule"):
        config_check.check_fusion(config)
    config = demo.get_config()
    config.eval.fusion_weight = 1.5
    with pytest.raises(ConfigError, match="fusion_weight"):
        config_check.check_fusion(config)
    config = demo.get_config()
    config.eval.pixel_workdir = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a trained DAE run folder"):
        config_check.check_fusion(config)
    config.method = "vae"
    with pytest.raises(ConfigError, match="expected one of patch2loc, dae"):
        config_check.method(config)


def test_pixel_workdir_fills_in_the_fold_and_seed_of_a_sweep():
    config = demo.get_config()
    config.fold, config.seed = 3, 7
    config.eval.pixel_workdir = "runs/demo_dae/fold={fold},seed={seed}"
    assert config_check.pixel_workdir(config) == "runs/demo_dae/fold=3,seed=7"
    config.eval.pixel_workdir = "runs/{name}"
    with pytest.raises(ConfigError, match="only {fold} and {seed}"):
        config_check.pixel_workdir(config)
