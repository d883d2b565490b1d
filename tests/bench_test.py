"""`make bench` (benchmarks.bench) and the side-by-side comparison (benchmarks/side_by_side.py)."""

import json

import pytest

from benchmarks import bench, side_by_side

TINY = [
    "--image-size", "32", "--patch-size", "8", "--patches", "64", "--train-slices", "8",
    "--steps", "2", "--warmup", "1", "--infer-batch", "64", "--infer-reps", "2",
    "--slices", "1", "--stride1-slices", "1", "--full-slices", "2",
    "--pipeline-volumes", "2", "--pipeline-batches", "3",
    "--dae-width", "4", "--dae-slices", "2", "--dae-steps", "1",
]  # fmt: skip


@pytest.mark.slow  # runs the benchmark end to end
def test_bench_prints_one_json_line_with_every_figure(capsys):
    assert bench.main(TINY) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # tfds progress and logs go to stderr
    r = json.loads(out[0])
    assert r["impl"] == "p2l" and r["device_count"] >= 1 and r["device_kind"]
    assert r["dtype"] == "float32" and r["peak_host_memory_mib"] > 0
    tr = r["train"]
    # 4x candidates on half-brain slices: the 64-slot buffer is full every step.
    assert tr["valid_patches_mean"] == 64 and tr["train_patches_per_s"] > 0
    assert tr["steps_timed"] == 2 and tr["includes_sampling"] is True
    inf = r["infer"]
    assert inf["infer_patches_per_s"] > 0 and inf["forward_batch_global"] == 64
    v = inf["volume"]
    assert (v["stride"], v["slices"]) == (4, 1)
    assert 0 < v["patches"] < v["patches_dense"] == 8 * 8  # skipping outside the brain
    assert v["extrapolated_full_volume_slices"] == 2
    assert v["extrapolated_full_volume_wall_s"] == pytest.approx(2 * v["wall_s"])
    assert inf["volume_stride1"]["patches_dense"] == 32 * 32
    p = r["pipeline"]
    assert p["read_slices"] == 2 * 48 and p["read_slices_per_s"] > 0
    assert p["batch_slices"] == 3 * 2 and p["batch_slices_per_s"] > 0
    feed = r["feed"]
    assert feed["host_slices_per_s"] > 0 and feed["device_slices_per_s"] > 0
    assert feed["step_s_median"] == tr["step_s_median"] and feed["batches_timed"] == 3
    dae = r["dae"]
    assert (dae["width"], dae["train_slices_per_step"], dae["volume_slices"]) == (4, 2, 2)
    assert dae["train_slices_per_s"] > 0 and dae["infer_slices_per_s"] > 0
    assert dae["volume_s_with_postprocess"] > 0 and dae["params"] > 0


def test_bench_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--patches", "0"])
    assert "--patches must be >= 1" in capsys.readouterr().err


def test_synthetic_slices_are_brain_like():
    import numpy as np

    image, mask = bench.synthetic_slices(5, 40, 40, np.random.default_rng(0))
    assert image.shape == mask.shape == (5, 40, 40)
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert not image[mask == 0].any() and 0.15 < mask.mean() < 0.6


# --- side by side ---------------------------------------------------------------------------------


def _run(train, infer, vol_wall=None):
    r = {"train": {"train_patches_per_s": train}, "infer": {"infer_patches_per_s": infer}}
    if vol_wall is not None:
        r["infer"]["volume"] = {"wall_s": 1.0, "extrapolated_full_volume_wall_s": vol_wall}
    return r


def test_ratios_are_paired_per_round_and_oriented_so_above_one_is_faster():
    pairs = [
        (_run(100, 1000, vol_wall=60.0), _run(150, 1100, vol_wall=30.0)),
        (_run(200, 1000, vol_wall=60.0), _run(100, 3000, vol_wall=20.0)),
        (_run(100, 2000), _run(120, 2000)),
    ]
    s = side_by_side.summarize(pairs)
    tr = s["train_patches_per_s"]
    assert tr["ratios"] == pytest.approx([1.5, 0.5, 1.2])
    assert (tr["ratio_min"], tr["ratio_median"], tr["ratio_max"]) == pytest.approx((0.5, 1.2, 1.5))
    assert tr["reference_median"] == 100 and tr["p2l_median"] == 120
    assert s["infer_patches_per_s"]["ratio_median"] == pytest.approx(1.1)
    vol = s["volume_full_wall_s"]  # time: reference / p2l, only rounds that measured it
    assert vol["ratios"] == pytest.approx([2.0, 3.0]) and "time" in vol["ratio_definition"]
    assert "volume_stride1_full_wall_s" not in s


def test_last_json_line_ignores_progress_output():
    text = 'Downloading...\n{"a": 1}\nnot json {\n{"b": 2}\ntrailing words\n'
    assert side_by_side.last_json_line(text) == {"b": 2}
    with pytest.raises(ValueError, match="no JSON"):
        side_by_side.last_json_line("nothing here\n")


def test_interleaves_reference_and_p2l(monkeypatch):
    calls = []

    def fake_run(cmd, label, env=None, timeout=None):
        calls.append(cmd[0])
        return {"who": cmd[0]}

    monkeypatch.setattr(side_by_side, "run_json", fake_run)
    pairs = side_by_side.interleave(["ref"], ["p2l"], 3)
    assert calls == ["ref", "p2l"] * 3
    assert pairs == [({"who": "ref"}, {"who": "p2l"})] * 3


def test_skips_cleanly_without_the_reference(tmp_path, capsys):
    assert side_by_side.main(["--reference", str(tmp_path / "absent.py")]) == 0
    assert "skipped" in capsys.readouterr().out


def test_skips_cleanly_when_torch_is_missing_and_setup_is_off(tmp_path, capsys):
    script = tmp_path / "reference_torch.py"
    script.write_text("print('{}')\n")
    argv = ["--reference", str(script), "--ref-venv", str(tmp_path / "novenv"), "--no-setup"]
    assert side_by_side.main(argv) == 0
    assert "skipped" in capsys.readouterr().out


def test_both_harnesses_get_the_same_size_flags():
    args = side_by_side.parse_args(["--patches", "512", "--infer-batch", "256", "--skip-volumes"])
    flags = side_by_side.shared_args(args)
    assert flags[flags.index("--patches") + 1] == "512"
    assert flags[flags.index("--infer-batch") + 1] == "256"
    assert flags[flags.index("--slices") + 1] == "0"
    assert flags[flags.index("--stride1-slices") + 1] == "0"
    # Every shared flag exists in benchmarks.bench with the same spelling.
    bench.parse_args(flags)


def test_default_xla_flags_are_added_once_and_never_override(monkeypatch):
    import jax._src.xla_bridge as xla_bridge

    from p2l import xla_flags

    monkeypatch.setattr(xla_flags.jax, "__version__", xla_flags.PINNED_JAX)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_flags.apply() == list(xla_flags.CPU_FLAGS)
    assert xla_flags.apply() == []  # idempotent
    flags = xla_flags.os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=2" and len(flags) == 2
    name = xla_flags.CPU_FLAGS[0].split("=")[0]
    monkeypatch.setenv("XLA_FLAGS", f"{name}=dot")  # the user's own value wins
    assert xla_flags.apply() == []
    monkeypatch.setattr(xla_flags.jax, "__version__", "0.0.1")  # unknown flags abort XLA
    monkeypatch.delenv("XLA_FLAGS")
    assert xla_flags.apply() == [] and "XLA_FLAGS" not in xla_flags.os.environ


def test_flags_are_not_claimed_once_jax_has_started(monkeypatch, capsys):
    import jax._src.xla_bridge as xla_bridge

    from p2l import xla_flags

    monkeypatch.setattr(xla_flags.jax, "__version__", xla_flags.PINNED_JAX)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_flags.apply() == []
    assert "XLA_FLAGS" not in xla_flags.os.environ
    assert "running without" in capsys.readouterr().err


def test_a_fresh_process_starts_jax_with_the_flags():
    """Importing p2l's modules does not start JAX, so apply() at an entry point takes effect."""
    import os
    import subprocess
    import sys

    from p2l import xla_flags

    code = (
        "import p2l.train, p2l.detect, p2l.evaluate, benchmarks.bench; from p2l import xla_flags; "
        "import jax, os; added = xla_flags.apply(); jax.devices(); "
        "print(jax.__version__ == xla_flags.PINNED_JAX, bool(added), os.environ['XLA_FLAGS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = ""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    if out[0] == "True":  # the pinned version: the flag is set and XLA accepted it
        assert out[1] == "True" and out[2:] == list(xla_flags.CPU_FLAGS)


@pytest.mark.slow  # times every stage of the network twice
def test_layer_probe_times_every_stage_of_the_network():
    import jax
    import jax.numpy as jnp

    from benchmarks import layer_probe
    from p2l.model import Patch2Loc, init_variables

    for impl in ("auto", "xla"):
        rows = layer_probe.probe(batch=4, conv_impl=impl, reps=1)
        assert len(rows) == 1 + 8 + 1  # stem, eight blocks, pool + heads
        assert rows[0][0].startswith("stem") and rows[-1][0].startswith("pool")
        assert all(fwd > 0 and train > 0 for _, fwd, train in rows)
    # The probe's stem is the encoder's own: the same variables as inside the network.
    probe_stem = layer_probe.Stem("auto").init(
        jax.random.key(0), jnp.zeros((2, 24, 24, 1)), train=False
    )
    encoder = init_variables(Patch2Loc(), jax.random.key(0), 24)
    shapes = lambda tree: jax.tree_util.tree_map(lambda v: v.shape, tree)  # noqa: E731
    assert shapes(probe_stem["params"]) == {
        k: shapes(encoder["params"]["encoder"][k]) for k in ("conv1", "bn1")
    }
    assert shapes(probe_stem["batch_stats"]) == {
        "bn1": shapes(encoder["batch_stats"]["encoder"]["bn1"])
    }
