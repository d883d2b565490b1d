"""Training: multi-device equivalence, determinism, resume after a kill, NaN stop, config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from p2l import checkpoint, input_pipeline, parallel, run_status, train
from p2l.model import create_model
from tests.conftest import demo_config

REPO = Path(__file__).resolve().parents[1]


def run_module(args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kw
    )


@pytest.mark.slow  # a subprocess with 8 fake devices and a 1-device reference
def test_eight_device_step_equals_one_device_step():
    out = run_module(
        ["tests/multidevice_step_check.py"],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8 and r["padded"] == [6, 8]
    # Same candidates, same accepted patches: sampling does not depend on the sharding.
    assert r["valid"][0] == r["valid"][1] > 0 and r["overflow"] == [0.0, 0.0]
    assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5)
    assert r["batch_stats_rel_diff"] < 1e-4
    # Gradients agree to float32 summation order; BatchNorm's backward at initialisation
    # cancels a large common component, which amplifies that to ~1e-3 relative.
    assert r["update_rel_diff"] < 2e-2


def synthetic_losses(seed, steps=3):
    config = demo_config(Path("/nonexistent"))
    config.seed = seed
    rng = np.random.default_rng(0)
    size = 96
    yy, xx = np.mgrid[:size, :size]
    mask = (((yy - 48) / 38.0) ** 2 + ((xx - 48) / 32.0) ** 2) <= 1
    image = rng.random((6, 5, size, size), dtype=np.float32) * mask
    bank = input_pipeline.SliceBank(
        image, np.broadcast_to(mask, image.shape).astype(np.uint8), list("abcdef")
    )
    mesh = parallel.create_mesh()
    geo = train.step_geometry(config, 4, config.sampling.num_candidates, 1)
    model = create_model(config)
    tx = train.make_optimizer(config)
    init_key, base_key = jax.random.split(jax.random.key(config.seed))
    state = train.create_train_state(config, model, tx, init_key)
    step_fn = train.make_train_step(model, tx, config, geo, mesh)
    out = []
    for step in range(steps):
        rows, slices = input_pipeline.select_train_slices(step, 6, 4, 5, config.seed)
        batch = parallel.to_global(input_pipeline.assemble_batch(bank, rows, slices, 4), mesh)
        state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
        out.append(float(metrics["loss"]))
    return out


@pytest.mark.slow  # trains twice
def test_same_seed_same_first_losses():
    a, b, c = synthetic_losses(1), synthetic_losses(1), synthetic_losses(2)
    assert a == b
    assert a != c


def test_train_batch_selection_is_a_function_of_step():
    r1, s1 = input_pipeline.select_train_slices(5, 387, 356, 100, 3141)
    r2, s2 = input_pipeline.select_train_slices(5, 387, 356, 100, 3141)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)
    assert len(set(r1.tolist())) == 356  # one slice per subject row, drop_last
    # each row cycles through all its slices before repeating (RandomPopper)
    seen = [input_pipeline.select_train_slices(e, 4, 4, 10, 0)[1][0] for e in range(10)]
    rows = [input_pipeline.select_train_slices(e, 4, 4, 10, 0)[0][0] for e in range(10)]
    per_row = {}
    for r, s in zip(rows, seen):
        per_row.setdefault(int(r), []).append(int(s))
    for slices in per_row.values():
        assert len(slices) == len(set(slices))


def restore_params(workdir: Path, config):
    model = create_model(config)
    tx = train.make_optimizer(config)
    like = train.create_train_state(config, model, tx, jax.random.key(0))
    like = jax.device_put(like, parallel.replicated(parallel.create_mesh()))
    ckpt = checkpoint.Checkpointer(workdir)
    state = ckpt.restore(like)
    ckpt.close()
    return state


@pytest.mark.slow  # trains three times, once killed in a subprocess
def test_kill_and_resume_continues_with_identical_state(small_demo, tmp_path, capsys):
    overrides = {"num_steps": 8, "checkpoint_every": 2, "log_every": 2, "eval_every": 4}
    config = demo_config(small_demo, **overrides)
    # Uninterrupted reference run (also: the demo config trains end to end).
    straight = tmp_path / "straight"
    train.train_and_evaluate(config, straight)
    assert (straight / "metrics.jsonl").exists() and (straight / "run_info.json").exists()
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8] and "val_loss" in records[1]

    # A real kill (SIGKILL, no chance to clean up) once step 4's checkpoint is complete.
    killed = tmp_path / "killed"
    flags = [f"--config.{k}={v}" for k, v in overrides.items()] + [
        f"--config.data_root={config.data_root}",
        f"--config.splits_dir={config.splits_dir}",
        f"--config.tfds_dir={config.tfds_dir}",
        "--config.sampling.slices_per_step=4",
        "--config.num_steps=1000",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2l.main", "--config=experiments/demo.py:tiny",
         f"--workdir={killed}", *flags],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 400
    while not (killed / "checkpoints" / "4").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "4").is_dir()
    state = run_status.run_state(killed, 8)
    assert state.label.startswith("stopped without a word (killed?) at checkpoint ")

    # Resume to step 8 with the same config: picks up the latest complete checkpoint, and the
    # workdir lock the killed process left.
    capsys.readouterr()
    resumed = train.train_and_evaluate(config, killed)
    assert int(resumed.step) == 8
    out = capsys.readouterr().out
    assert f"was left by pid {proc.pid} on " in out and "taking it over" in out
    a = restore_params(straight, config)
    b = restore_params(killed, config)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # A finished run is not trained again.
    again = train.train_and_evaluate(config, killed)
    assert int(again.step) == 8


@pytest.mark.slow  # trains
def test_non_finite_loss_stops_without_checkpointing_nan(small_demo, tmp_path):
    config = demo_config(small_demo, num_steps=6, checkpoint_every=1, log_every=1, eval_every=100)
    config.optim.learning_rate = 1e30
    with pytest.raises(train.TrainingDiverged, match="non-finite loss at step"):
        train.train_and_evaluate(config, tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path)
    latest = ckpt.latest_step()
    ckpt.close()
    assert latest is not None
    state = restore_params(tmp_path, config)
    for leaf in jax.tree_util.tree_leaves(state.params):
        assert np.isfinite(np.asarray(leaf)).all()


def test_missing_data_root_fails_at_once_with_what_to_set():
    out = run_module(["-m", "p2l.main", "--config=experiments/brats.py", "--workdir=/tmp/p2l-x"])
    assert out.returncode != 0
    assert "config.data_root: not set" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_config_key_names_the_key():
    out = run_module(
        ["-m", "p2l.main", "--config=experiments/brats.py", "--workdir=/tmp/p2l-x",
         "--config.sampling.rejection_rat=0.3"]
    )  # fmt: skip
    assert out.returncode != 0
    assert "rejection_rat" in out.stderr and "rejection_rate" in out.stderr
    assert "Traceback" not in out.stderr
