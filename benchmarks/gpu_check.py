"""`make gpu-check`: one JSON line saying how p2l runs on a lent accelerator machine.

Made for a bare GPU machine that gets the repository alone (no ../shared, no data, no
TensorFlow): random weights, synthetic slices and volumes, the packages `make gpu-check` installs.

    python -m benchmarks.gpu_check [--shrink] [--tests FILE ...] [--skip-bench]
                                   [--reference-train-patches-per-s X]

Figures (keys of the JSON line; every timing excludes compilation, which is reported apart):
- backend, device kind and count, jax version, the conv form "auto" resolved to, the matmul
  precision, XLA_FLAGS, whether TensorFlow got imported (it must not be);
- tests: TF-free test files run by pytest in a subprocess before this process starts JAX, at
  matmul precision "highest" (they compare forms of the network at float32 tolerances), or
  skipped with the reason;
- bench: benchmarks.bench's training step at the reference harness's sizes (1,024 valid 24x24
  patches per step from 356 slices of 192x192) and its eval-mode forward throughput;
- train_full: one training step of experiments/base.py's sizes (192x192x100 geometry, 356 slices,
  32,384 candidates, the static buffer of p2l.train.step_geometry): seconds per step and valid
  patches/s. No GPU figure of the PyTorch reference exists in this project, so the ratio to it
  is reported only when --reference-train-patches-per-s gives one (e.g. from
  `make bench-compare ARGS="--device cuda"` on the same machine);
- volume_stride1: a stride-1 heatmap of one 192x192x100 volume through p2l.scoring.Scorer (the
  path of evaluation and detection), without post-processing (brain voxels only) and with it
  (the voxels the median filter can reach, then the filter and the brain mask);
- peak device memory (`memory_stats()`, null where the backend has none);
- targets of the real-scale issue for one H100/H200: the stride-1 volume with post-processing
  in <= 1 s, training at >= 3x the reference's patches/s.

`--shrink` (or P2L_GPU_CHECK_SHRINK=1) makes every size tiny, so the whole check runs on a CPU in
seconds (tests/gpu_check_test.py); its figures say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Test files that need neither TensorFlow, nibabel nor ../shared, and run in a few minutes on a GPU.
TF_FREE_TESTS = (
    "tests/losses_test.py",
    "tests/patches_test.py",
    "tests/model_test.py",
    "tests/stem_test.py",
    "tests/heatmap_inference_test.py",
    "tests/postprocess_test.py",
    "tests/numerics_test.py",
)
VOLUME_TARGET_S = 1.0  # stride-1 192x192x100 volume, post-processing included (real-scale issue)
TRAIN_TARGET_RATIO = 3.0  # training patches/s over the reference's on the same accelerator


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_tests(files: list[str], timeout_s: float) -> dict:
    """pytest on `files` in a subprocess; its summary line, or why it did not run."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "pytest is not installed", "files": files}
    missing = [f for f in files if not (REPO / f).is_file()]
    if missing:
        return {"status": "skipped", "reason": f"missing {missing}", "files": files}
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    # The tests compare forms of the network at float32 tolerances, which TF32 would not meet;
    # and this process allocates the device after them, so no memory is held twice.
    env.update(JAX_DEFAULT_MATMUL_PRECISION="highest", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout_s, "files": files}
    lines = [ln for ln in out.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    result = {
        "status": "passed" if out.returncode == 0 else "failed",
        "returncode": out.returncode,
        "summary": lines[-1].strip("= ") if lines else out.stdout[-300:],
        "files": files,
        "wall_s": time.perf_counter() - t0,
    }
    if out.returncode != 0:
        # The failing tests' names, for the JSON line; the full log went to stderr.
        result["failures"] = [ln for ln in out.stdout.splitlines() if ln.startswith("FAILED")]
        log(out.stdout[-5000:] + out.stderr[-2000:])
    return result


def shrunk_config(config):
    """Every size of the full check made tiny (a few seconds on a CPU)."""
    config.data.image_shape = (32, 32, 4)
    config.sampling.slices_per_step = 4
    config.sampling.num_candidates = 64
    config.eval.batch_size = 64
    config.eval.median_size = 3
    return config


def bench_args(args, patch: int, size: int):
    """benchmarks.bench's arguments: its defaults (the reference harness's sizes) or tiny."""
    from benchmarks import bench

    common = ["--conv-impl", args.conv_impl, "--matmul-precision", args.matmul_precision]
    common += ["--slices", "0", "--stride1-slices", "0", "--skip-pipeline"]
    if not args.shrink:
        return bench.parse_args(common + ["--steps", "5", "--warmup", "2"])
    tiny = ["--image-size", str(size), "--patch-size", str(patch), "--patches", "16"]
    tiny += ["--train-slices", "4", "--steps", "1", "--warmup", "1", "--infer-batch", "32"]
    return bench.parse_args(common + tiny + ["--infer-reps", "1"])


def random_state(config, model, tx, mesh, seed: int):
    """A train state of random weights drawn on the host: kernels N(0, 1/fan_in), BatchNorm at
    its initial values. Compiling the network's initialiser takes XLA:CPU longer than the train
    step itself (~25 s of a loaded 2-core CPU), and a speed check needs no particular init."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from p2l import parallel, patches, train_state
    from p2l.model import init_variables

    patch = patches.patch_size_for(config.data.image_shape[0], config.sampling.patch_fraction)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), patch))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    params = variables["params"]
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=jax.jit(tx.init)(params),
    )
    return jax.device_put(state, parallel.replicated(mesh))


def train_full(config, mesh, steps: int, seed: int) -> tuple[dict, dict]:
    """Figures of `steps` reference-size training steps after one compiling step, and the
    resulting eval-mode variables."""
    import jax
    import numpy as np

    from benchmarks import bench
    from p2l import train, train_state
    from p2l.model import create_model

    sampling = config.sampling
    geometry = train.step_geometry(
        config, sampling.slices_per_step, sampling.num_candidates, mesh.devices.size
    )
    size = config.data.image_shape[0]
    batches = bench.synthetic_train_batches(
        geometry.slices, geometry.padded_slices, size, seed, mesh
    )
    model = create_model(config)
    tx = train_state.make_optimizer(config)
    state = random_state(config, model, tx, mesh, seed)
    step_fn = train.make_train_step(model, tx, config, geometry, mesh)
    base_key = jax.random.key(seed + 1)
    times, valid, overflow, finite = [], [], [], []
    compile_s = None
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batches[i % 2], jax.random.fold_in(base_key, i))
        metrics = jax.device_get(metrics)  # also waits for the step
        dt = time.perf_counter() - t0
        if i == 0:
            compile_s = dt  # compilation and the first step
            continue
        times.append(dt)
        valid.append(float(metrics["valid_patches"]))
        overflow.append(float(metrics["overflow"]))
        finite.append(bool(metrics["finite"] > 0))
    step_s = statistics.median(times)
    mean_valid = float(np.mean(valid))
    log(f"  full-size step: {step_s:.3f} s, {mean_valid:.0f} valid patches -> "
        f"{mean_valid / step_s:,.0f} patches/s")  # fmt: skip
    figures = {
        "image_shape": list(config.data.image_shape),
        "slices_per_step": geometry.slices,
        "num_candidates": geometry.num_candidates,
        "buffer_patches": geometry.capacity,
        "compile_and_first_step_s": compile_s,
        "steps_timed": steps,
        "step_s_median": step_s,
        "step_s_min": min(times),
        "valid_patches_mean": mean_valid,
        "overflow_mean": float(np.mean(overflow)),
        "all_finite": all(finite),
        "patches_per_s": mean_valid / step_s,
        "includes_sampling": True,
    }
    return figures, {"params": state.params, "batch_stats": state.batch_stats}


def volume_stride1(config, model, variables, reps: int, seed: int) -> dict:
    """Stride-1 heatmap of one synthetic volume of the config's shape through Scorer."""
    import numpy as np

    from benchmarks import bench
    from p2l.scoring import Scorer

    h, w, d = config.data.image_shape
    config.eval.stride = 1
    image, mask = bench.synthetic_slices(d, h, w, np.random.default_rng(seed))
    volume, mask = image.transpose(1, 2, 0), mask.transpose(1, 2, 0)  # (H, W, D)
    scorer = Scorer(config, model, variables)
    t0 = time.perf_counter()
    scorer("warm-up", volume, mask)  # compiles the forward, starts post-processing's threads
    compile_s = time.perf_counter() - t0

    def timed(filtered: bool):
        walls, scored = [], None
        for _ in range(reps):
            t = time.perf_counter()
            scored = scorer("volume", volume, mask, filtered=filtered)
            walls.append(time.perf_counter() - t)
        if not np.isfinite(scored.score).all():
            raise RuntimeError("non-finite heatmap of the synthetic volume")
        return statistics.median(walls), scored.patches_evaluated

    heatmap_s, heatmap_patches = timed(False)
    full_s, full_patches = timed(True)
    log(f"  stride-1 volume {h}x{w}x{d}: heatmap {heatmap_s:.2f} s ({heatmap_patches:,} patches), "
        f"with post-processing {full_s:.2f} s ({full_patches:,} patches)")  # fmt: skip
    return {
        "shape": [h, w, d],
        "forward_batch": config.eval.batch_size,
        "dtype": config.eval.dtype,
        "median_size": config.eval.median_size,
        "reps": reps,
        "compile_and_first_volume_s": compile_s,
        "heatmap_s": heatmap_s,
        "heatmap_patches": heatmap_patches,
        "with_postprocess_s": full_s,
        "with_postprocess_patches": full_patches,
        "patches_per_s": full_patches / full_s,
    }


def peak_device_memory_gib() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def parse_args(argv=None) -> argparse.Namespace:
    from p2l.layers import CONV_IMPLS, MATMUL_PRECISIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shrink",
        action="store_true",
        default=os.environ.get("P2L_GPU_CHECK_SHRINK", "") not in ("", "0"),
        help="tiny sizes: the whole check in seconds on a CPU (also P2L_GPU_CHECK_SHRINK=1)",
    )
    ap.add_argument(
        "--tests",
        nargs="*",
        default=None,
        help="test files to run first (default: the TF-free subset; none with --shrink)",
    )
    ap.add_argument("--tests-timeout", type=float, default=300.0, help="seconds")
    ap.add_argument("--steps", type=int, default=None, help="timed full-size steps (default 5)")
    ap.add_argument("--reps", type=int, default=None, help="timed volumes (default 2)")
    ap.add_argument("--conv-impl", choices=CONV_IMPLS, default="auto")
    ap.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="default")
    ap.add_argument(
        "--reference-train-patches-per-s",
        type=float,
        default=None,
        help="the PyTorch reference's training patches/s on this machine, for the 3x target",
    )
    ap.add_argument(
        "--skip-bench", action="store_true", help="leave out benchmarks.bench's figures (1)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tests is None:
        args.tests = [] if args.shrink else list(TF_FREE_TESTS)
    args.steps = args.steps or (1 if args.shrink else 5)
    args.reps = args.reps or (1 if args.shrink else 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_all = time.perf_counter()
    # Before this process starts JAX: the tests' process gets the device to itself.
    if args.tests:
        log(f"p2l gpu-check: pytest {' '.join(args.tests)}")
        tests = run_tests(args.tests, args.tests_timeout)
    else:
        tests = {"status": "skipped", "reason": "no test files (--shrink or --tests)"}
    log(f"  tests: {tests['status']} {tests.get('summary', tests.get('reason', ''))}")

    from p2l import xla_flags

    xla_flags.apply()  # as every entry point; inert off the CPU backend
    import jax

    from benchmarks import bench
    from experiments import base
    from p2l import config_check, parallel, patches, run_info
    from p2l.model import create_model

    config = base.base_config()
    config.model.conv_impl = args.conv_impl
    config.matmul_precision = args.matmul_precision
    if args.shrink:
        config = shrunk_config(config)
    config_check.check_numerics(config)
    dev = jax.devices()[0]
    result = {
        "check": "p2l gpu-check",
        "shrink": args.shrink,
        "jax": jax.__version__,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        **run_info.numerics(config),
        "conv_impl_config": config.model.conv_impl,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "tests": tests,
    }
    log(f"p2l gpu-check: jax {jax.__version__}, {jax.device_count()} x {dev.device_kind}, "
        f"conv {result['conv_impl']}, precision {result['matmul_precision']}")  # fmt: skip
    mesh = parallel.create_mesh()
    size = config.data.image_shape[0]
    patch = patches.patch_size_for(size, config.sampling.patch_fraction)

    if args.skip_bench:
        result["bench"] = {"skipped": "--skip-bench"}
    else:
        log("(1) benchmarks.bench: training step and eval forward at the reference's sizes")
        bargs = bench_args(args, patch, size)
        bench_train, trained = bench.bench_train(bargs, mesh)
        result["bench"] = {"train": bench_train, "infer": bench.bench_infer(bargs, trained)}

    log("(2) one full-size training step (experiments/base.py)")
    result["train_full"], variables = train_full(config, mesh, args.steps, args.seed)

    log("(3) stride-1 heatmap of a full volume (p2l.scoring.Scorer)")
    model = create_model(config)
    result["volume_stride1"] = volume_stride1(config, model, variables, args.reps, args.seed)

    result["peak_device_memory_gib"] = peak_device_memory_gib()
    reference = args.reference_train_patches_per_s
    ratio = None if reference is None else result["train_full"]["patches_per_s"] / reference
    volume_s = result["volume_stride1"]["with_postprocess_s"]
    result["targets"] = {
        "volume_stride1_s": volume_s,
        "volume_stride1_target_s": VOLUME_TARGET_S,
        "volume_stride1_met": volume_s <= VOLUME_TARGET_S,
        "reference_train_patches_per_s": reference,
        "train_vs_reference": ratio,
        "train_target_ratio": TRAIN_TARGET_RATIO,
        "train_met": None if ratio is None else ratio >= TRAIN_TARGET_RATIO,
    }
    result["tensorflow_loaded"] = "tensorflow" in sys.modules
    result["total_wall_s"] = time.perf_counter() - t_all
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0 if tests["status"] in ("passed", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
