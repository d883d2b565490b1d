"""Two p2l.main processes on loopback (JAX CPU collectives) train and evaluate like one process
with the same global batch and the same device count."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import demo_config
from tests.train_test import REPO, restore_params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two training processes and a reference run: minutes
def test_two_process_training_and_evaluation_equal_one_process(small_demo, tmp_path):
    config = demo_config(small_demo)
    common = [
        "-m", "p2l.main", "--config=experiments/demo.py:tiny",
        f"--config.data_root={config.data_root}", f"--config.splits_dir={config.splits_dir}",
        f"--config.tfds_dir={config.tfds_dir}", "--config.sampling.slices_per_step=4",
        "--config.num_steps=3", "--config.log_every=1", "--config.eval_every=100",
        "--config.checkpoint_every=3", "--mode=train_eval", "--config.eval.stride=4",
        "--config.eval.max_volumes=2", "--config.eval.max_healthy_volumes=2",
        "--config.eval.num_figures=0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("XLA_FLAGS", None)
    two, one = tmp_path / "two", tmp_path / "one"
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                *common,
                f"--workdir={two}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={pid}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for pid in (1, 0)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    single = subprocess.run(
        [sys.executable, *common, f"--workdir={one}"],
        cwd=REPO,
        env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert "2 device(s)" in outs[1] and "2 device(s)" in single.stdout

    def losses(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    a, b = restore_params(two, config), restore_params(one, config)
    leaves_a = jax.tree_util.tree_leaves((a.params, a.batch_stats))
    leaves_b = jax.tree_util.tree_leaves((b.params, b.batch_stats))
    flat_a = np.concatenate([np.ravel(x) for x in leaves_a])
    flat_b = np.concatenate([np.ravel(x) for x in leaves_b])
    # Same programs per device; only the all-reduce implementation differs (gloo vs in-process).
    assert np.linalg.norm(flat_a - flat_b) / np.linalg.norm(flat_a) < 1e-4

    # Distributed evaluation: volumes split across the processes, rows gathered, written once.
    sa = json.loads((two / "results" / "summary.json").read_text())
    sb = json.loads((one / "results" / "summary.json").read_text())
    assert sa["processes"] == 2 and sb["processes"] == 1
    assert sa["sets"]["Synth"]["volumes"] == sb["sets"]["Synth"]["volumes"] == 2
    for key in ("healthy_q98", "validation[Synth]"):
        assert sa["thresholds"][key]["volumes"] == sb["thresholds"][key]["volumes"]
        np.testing.assert_allclose(
            sa["thresholds"][key]["value"], sb["thresholds"][key]["value"], rtol=1e-3
        )
    for key in ("auroc", "auprc", "dice[oracle]"):
        np.testing.assert_allclose(
            sa["sets"]["Synth"]["metrics"][key]["mean"],
            sb["sets"]["Synth"]["metrics"][key]["mean"],
            rtol=1e-3,
        )

    def ids(workdir):
        lines = (workdir / "results" / "synth_volumes.csv").read_text().splitlines()[1:]
        return [line.split(",")[1] for line in lines]

    assert ids(two) == ids(one)
