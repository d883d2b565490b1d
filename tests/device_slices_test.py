"""Training slices gathered on the devices equal the host's batches bit for bit (device_slices)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from p2l import config_check, device_slices, parallel, train
from p2l.errors import ConfigError
from p2l.model import create_model
from tests.conftest import demo_config
from tests.device_slices_check import mismatches, synthetic_bank
from tests.train_test import run_module


def test_device_batches_equal_assemble_batch():
    mesh = parallel.create_mesh()
    # An odd batch of an uneven bank, past the first epoch and the first slice cycle.
    bank = synthetic_bank(rows=7, slices=3)
    assert mismatches(mesh, bank, batch=3, steps=9, seed=11) == []


# A subprocess with 8 fake CPU devices; no model compiled, so it stays in the fast suite (~12 s).
def test_device_batches_equal_assemble_batch_on_eight_devices():
    out = run_module(
        ["tests/device_slices_check.py"],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"devices": 8, "mismatches": []}


@pytest.mark.slow  # compiles a train step
def test_short_training_is_identical_on_device_and_host_paths():
    config = demo_config(Path("/nonexistent"), num_steps=3)
    config.sampling.num_candidates = 128
    bank = synthetic_bank(rows=6, slices=5, size=96, seed=1)
    mesh = parallel.create_mesh()
    geo = train.step_geometry(config, 4, config.sampling.num_candidates, mesh.devices.size)
    model = create_model(config)
    tx = train.make_optimizer(config)
    init_key, base_key = jax.random.split(jax.random.key(config.seed))
    # Host copies: each run puts its own on the device (the step donates the state).
    initial = jax.device_get(
        jax.jit(lambda key: train.create_train_state(config, model, tx, key))(init_key)
    )
    step_fn = train.make_train_step(model, tx, config, geo, mesh)  # one compilation for both

    def run(path):
        state = jax.device_put(initial, parallel.replicated(mesh))
        losses = []
        for step, batch in enumerate(
            device_slices.train_feed(bank, config, geo.padded_slices, 0, mesh, path)
        ):
            state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
            losses.append(float(metrics["loss"]))
        return losses, jax.tree_util.tree_leaves(jax.device_get(state.params))

    (loss_d, params_d), (loss_h, params_h) = run("device"), run("host")
    assert len(loss_d) == 3 and loss_d == loss_h
    assert all(np.array_equal(a, b) for a, b in zip(params_d, params_h, strict=True))


class FakeDevice:
    def __init__(self, stats, platform="gpu"):
        self.stats, self.platform = stats, platform

    def memory_stats(self):
        return self.stats


GiB = 2**30


def test_choose():
    gpu = [FakeDevice({"bytes_limit": 60 * GiB, "bytes_in_use": 10 * GiB})]
    assert device_slices.choose("auto", 7 * GiB, gpu)[0] == "device"
    path, why = device_slices.choose("auto", 30 * GiB, gpu)
    assert path == "host" and "50%" in why and "50.0 GiB" in why
    # The smallest free memory decides.
    small = gpu + [FakeDevice({"bytes_limit": 16 * GiB, "bytes_in_use": 4 * GiB})]
    assert device_slices.choose("auto", 7 * GiB, small)[0] == "host"
    cpu = [FakeDevice(None, "cpu")]
    path, why = device_slices.choose("auto", GiB, cpu)
    assert path == "host" and why == "auto: cpu devices report no memory limit"
    assert device_slices.choose("device", 30 * GiB, gpu)[0] == "device"  # forced
    assert device_slices.choose("host", GiB, gpu)[0] == "host"


def test_bad_setting_is_a_config_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "splits").mkdir()
    config = demo_config(tmp_path)
    config.data.device_slices = "gpu"
    with pytest.raises(
        ConfigError, match="data.device_slices.*'gpu'; expected auto, device or host"
    ):
        config_check.check_paths(config)


def test_pipeline_throughput_reports_both_paths_against_the_step():
    from benchmarks.bench import pipeline_throughput

    r = pipeline_throughput(shrink=True, step_s=0.5)  # the step time given: nothing compiled
    assert r["slices_per_step"] == 8 and r["bank_shape"] == [16, 4, 48, 48]
    assert r["host_slices_per_s"] > 0 and r["device_slices_per_s"] > 0
    assert r["step_consumes_slices_per_s"] == 16.0
    assert r["device_vs_step"] == r["device_slices_per_s"] / 16.0
    assert r["auto_choice"][0] == "host"  # CPU
    assert r["meets_target"] == (r["host_vs_fastest_step"] >= r["target_ratio"])
