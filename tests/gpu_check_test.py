"""`make gpu-check` (benchmarks.gpu_check) shrunk to CPU sizes: one JSON line, sane figures."""

import ast
import json
import sys

import jax
import pytest

from benchmarks import gpu_check


def _check(capsys, *flags) -> dict:
    assert gpu_check.main(["--shrink", *flags]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # progress goes to stderr
    return json.loads(out[0])


def test_shrunk_check_prints_one_json_line_with_sane_figures(capsys):
    # benchmarks.bench's part compiles a second train step; the slow test below covers it.
    tensorflow_before = "tensorflow" in sys.modules  # another test of this process may load it
    r = _check(capsys, "--skip-bench")
    assert r["shrink"] is True and r["backend"] == jax.default_backend() == "cpu"
    assert r["conv_impl"] == "matmul" and r["conv_impl_config"] == "auto"
    assert r["matmul_precision"] == "default" and r["device_count"] >= 1
    # The bare GPU machine has no TensorFlow: the check must not load it.
    assert r["tensorflow_loaded"] is tensorflow_before
    assert r["tests"]["status"] == "skipped" and r["bench"] == {"skipped": "--skip-bench"}
    tr = r["train_full"]
    assert tr["image_shape"] == [32, 32, 4] and tr["slices_per_step"] == 4
    assert tr["num_candidates"] == 64 and 0 < tr["valid_patches_mean"] <= tr["buffer_patches"]
    assert tr["all_finite"] and tr["step_s_median"] > 0 and tr["patches_per_s"] > 0
    assert tr["patches_per_s"] == pytest.approx(tr["valid_patches_mean"] / tr["step_s_median"])
    v = r["volume_stride1"]
    assert v["shape"] == [32, 32, 4] and v["heatmap_s"] > 0 and v["with_postprocess_s"] > 0
    # Post-processing needs the voxels the median filter can reach, beyond the brain's.
    assert 0 < v["heatmap_patches"] < v["with_postprocess_patches"] <= 32 * 32 * 4
    assert r["peak_device_memory_gib"] is None  # XLA:CPU reports no memory statistics
    t = r["targets"]
    assert t["volume_stride1_s"] == v["with_postprocess_s"] and t["volume_stride1_target_s"] == 1
    assert t["train_vs_reference"] is None and t["train_met"] is None  # no reference figure


@pytest.mark.slow  # the whole shrunk check: bench's figures and a pytest subprocess
def test_shrunk_check_with_bench_tests_and_a_reference_figure(capsys):
    r = _check(capsys, "--tests", "tests/losses_test.py", "--reference-train-patches-per-s", "1")
    assert r["tests"]["status"] == "passed" and "passed" in r["tests"]["summary"]
    assert r["bench"]["train"]["valid_patches_mean"] == 16
    assert r["bench"]["infer"]["infer_patches_per_s"] > 0
    t = r["targets"]
    assert t["train_vs_reference"] == pytest.approx(r["train_full"]["patches_per_s"])
    assert isinstance(t["train_met"], bool)


def test_missing_test_files_are_reported_not_run():
    r = gpu_check.run_tests(["tests/no_such_test.py"], timeout_s=5)
    assert r["status"] == "skipped" and "no_such_test.py" in r["reason"]


def test_gpu_test_subset_imports_no_tensorflow_nibabel_or_shared_data():
    """The subset runs where `make gpu-check` installs neither (Makefile, .venv-gpu)."""
    heavy = {"tensorflow", "tensorflow_datasets", "nibabel", "torch", "sklearn", "tests"}
    for name in gpu_check.TF_FREE_TESTS:
        source = (gpu_check.REPO / name).read_text()
        assert "shared_dir" not in source and "small_demo" not in source, name
        imported = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & heavy, (name, imported & heavy)
