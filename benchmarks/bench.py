"""`make bench`: one JSON line of p2l's throughput, flag-compatible with the PyTorch reference
harness reference_torch.py (its path is the user's: `benchmarks.side_by_side --reference PATH`).

    python -m benchmarks.bench [--patches 1024] [--infer-batch 1024] [--stride 4] [--slices 12] ...

Figures (warm-up excluded, medians over repetitions):
- train: valid patches/s of the jitted train step (p2l.train.make_train_step), patch sampling
  included, on synthetic brain-like slices with `--patches` valid patches per step.
- infer: patches/s of the eval-mode forward (p2l.heatmaps) and the wall time of a volume heatmap
  at `--stride` and at stride 1 plus post-processing (p2l.postprocess); volumes shorter than
  `--full-slices` are extrapolated and marked so.
- pipeline: slices/s read from a tfds build of generated data (data_prep.demo_data) and of the
  training batch iterator.
- feed: training slices/s the host and the device path (p2l.device_slices) deliver at the train
  sizes, against what the measured train step and the fastest realistic GPU step consume
  (`pipeline_throughput`, also called by benchmarks.scale_check).
- dae: slices/s of the DAE's train step and reconstruction, and one volume scored
  (benchmarks.dae_bench), beside Patch2Loc's figures.
- peak host memory, device kind and count, dtypes, XLA_FLAGS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# No TensorFlow at import (p2l.input_pipeline is imported by the pipeline figure alone): the
# training and inference figures also run in benchmarks.gpu_check's bare GPU environment.
from p2l import (
    heatmaps,
    layers,
    parallel,
    patches,
    postprocess,
    train,
    train_state,
    xla_flags,
)
from p2l.model import create_model, init_variables

MEDIAN_SIZE = postprocess.DEFAULT_MEDIAN_SIZE


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic_slices(n: int, h: int, w: int, rng: np.random.Generator):
    """n brain-like slices as the reference harness: an ellipse mask (size varying per slice)
    and uniform random intensities inside it. Returns (images, masks), (n, h, w) float32."""
    yy = np.linspace(-1.0, 1.0, h, dtype=np.float32).reshape(1, h, 1)
    xx = np.linspace(-1.0, 1.0, w, dtype=np.float32).reshape(1, 1, w)
    scale = (0.55 + 0.45 * rng.random((n, 1, 1))).astype(np.float32)
    mask = (((yy / (0.85 * scale)) ** 2 + (xx / (0.72 * scale)) ** 2) <= 1.0).astype(np.float32)
    return rng.random((n, h, w), dtype=np.float32) * mask, mask


def synthetic_train_batches(
    slices: int, padded: int, size: int, seed: int, mesh, count: int = 2
) -> list[dict]:
    """`count` global training batches of `slices` synthetic slices (`synthetic_slices`) at random
    positions of a 100-slice volume, zero-padded to `padded` rows: the layout of
    p2l.input_pipeline.assemble_batch, built without TensorFlow (single process)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        image = np.zeros((padded, size, size), np.float32)
        mask_one = np.zeros((padded, size, size), np.uint8)
        brain, mask = synthetic_slices(slices, size, size, rng)
        image[:slices], mask_one[:slices] = brain, mask
        position = np.zeros((padded,), np.float32)
        position[:slices] = patches.slice_position(rng.integers(0, 100, slices), 100)
        batch = {
            "image": image,
            "mask_one": mask_one,
            "position": position,
            "slice_index": np.arange(padded, dtype=np.int32),
        }
        batches.append(parallel.to_global(batch, mesh))
    return batches


def _summary(times: list[float]) -> dict:
    return {
        "median": statistics.median(times),
        "min": min(times),
        "mean": sum(times) / len(times),
    }


def bench_config(args):
    from experiments import base

    config = base.base_config()
    config.model.conv_impl = args.conv_impl
    config.matmul_precision = args.matmul_precision
    config.model.dtype = args.train_dtype
    config.sampling.rejection_rate = args.rejection_rate
    config.loss.beta = args.beta
    config.optim.learning_rate = args.lr
    return config


# --- (a) training ---------------------------------------------------------------------------------


def bench_train(args, mesh) -> tuple[dict, dict]:
    """Train-step figures, and the trained eval-mode variables (realistic BatchNorm stats)."""
    config = bench_config(args)
    devices = mesh.devices.size
    padded = parallel.padded_size(args.train_slices, devices)
    # Buffer = --patches valid slots, 4x candidates as the reference (spec §3.2), so every
    # step is full as long as more than a quarter of the candidates are accepted.
    geometry = train.StepGeometry(
        patch=args.patch_size,
        slices=args.train_slices,
        padded_slices=padded,
        per_slice=patches.candidates_per_slice(4 * args.patches, args.train_slices),
        num_candidates=4 * args.patches,
        capacity_per_device=math.ceil(args.patches / devices),
        devices=devices,
    )
    batches = synthetic_train_batches(args.train_slices, padded, args.image_size, args.seed, mesh)

    model = create_model(config)
    tx = train_state.make_optimizer(config)
    state = jax.jit(
        lambda key: train_state.create_train_state(config, model, tx, key),
        out_shardings=parallel.replicated(mesh),
    )(jax.random.key(args.seed))
    step_fn = train.make_train_step(model, tx, config, geometry, mesh)
    base_key = jax.random.key(args.seed + 1)

    times, valid, overflow, losses = [], [], [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batches[i % 2], jax.random.fold_in(base_key, i))
        metrics = jax.device_get(metrics)  # also waits for the step
        dt = time.perf_counter() - t0
        tag = "warm-up" if i < args.warmup else "timed"
        log(
            f"  train step {i + 1}/{args.warmup + args.steps} ({tag}): {dt:.3f}s, "
            f"{int(metrics['valid_patches'])} valid, loss {float(metrics['loss']):.3f}"
        )
        if i >= args.warmup:
            times.append(dt)
            valid.append(float(metrics["valid_patches"]))
            overflow.append(float(metrics["overflow"]))
            losses.append(float(metrics["loss"]))
    t = _summary(times)
    mean_valid = sum(valid) / len(valid)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return {
        "patches_per_step": args.patches,
        "candidates_per_step": geometry.num_candidates,
        "train_slices": args.train_slices,
        "valid_patches_mean": mean_valid,
        "valid_fraction": mean_valid / geometry.num_candidates,
        "overflow_mean": sum(overflow) / len(overflow),
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "step_s_median": t["median"],
        "step_s_min": t["min"],
        "step_s_mean": t["mean"],
        # Headline: median step time, as the reference (robust to VM hiccups). Includes sampling.
        "train_patches_per_s": mean_valid / t["median"],
        "train_patches_per_s_mean": mean_valid / t["mean"],
        "train_patches_per_s_best": mean_valid / t["min"],
        "includes_sampling": True,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }, variables


# --- (b) inference --------------------------------------------------------------------------------


def _eval_variables(model, args) -> dict:
    """Eval-mode variables with non-trivial BatchNorm statistics (a train-mode forward)."""

    def make(key):
        init_key, data_key = jax.random.split(key)
        variables = init_variables(model, init_key, args.patch_size)
        x = jax.random.uniform(data_key, (256, args.patch_size, args.patch_size, 1))
        _, updates = model.apply(
            variables, x, jnp.linspace(0, 99, 256), train=True, mutable=["batch_stats"]
        )
        return {"params": variables["params"], "batch_stats": updates["batch_stats"]}

    # One compilation instead of eager op-by-op dispatch of the whole network.
    return jax.jit(make)(jax.random.key(args.seed))


def _run_volume(model, variables, volume, mask, args, slices: int, stride: int) -> dict:
    """Heatmap + post-processing of the first `slices` slices of a synthetic volume."""
    vol, msk = volume[..., :slices], mask[..., :slices]
    region = postprocess.influence_region(msk, MEDIAN_SIZE)
    kwargs = dict(
        patch=args.patch_size,
        stride=stride,
        batch_size=args.infer_batch,
        num_slices=args.full_slices,
        dtype=args.infer_dtype,
    )
    # Warm-up (compilation, host paths): the first slice with its own region; at the default
    # sizes it fills at least one batch, so it compiles the batch shape the timed call uses.
    heatmaps.volume_heatmap(model, variables, vol[..., :1], region=region[..., :1], **kwargs)
    t0 = time.perf_counter()
    res = heatmaps.volume_heatmap(model, variables, vol, region=region, **kwargs)
    t1 = time.perf_counter()
    post = postprocess.postprocess(res.score, msk, median_size=MEDIAN_SIZE)
    t2 = time.perf_counter()
    if not np.isfinite(post).all():
        raise RuntimeError("non-finite heatmap in the benchmark volume")
    h, w = vol.shape[:2]
    out = {
        "stride": stride,
        "slices": slices,
        "patches": res.patches_evaluated,
        "patches_dense": heatmaps.grid_size(h, stride) * heatmaps.grid_size(w, stride) * slices,
        "heatmap_s": t1 - t0,
        "postprocess_s": t2 - t1,
        "wall_s": t2 - t0,
        "patches_per_s": res.patches_evaluated / (t1 - t0),
    }
    if slices != args.full_slices:
        factor = args.full_slices / slices
        out["extrapolated_full_volume_slices"] = args.full_slices
        out["extrapolated_full_volume_wall_s"] = out["wall_s"] * factor
        out["extrapolated_full_volume_patches"] = round(res.patches_evaluated * factor)
    return out


def bench_infer(args, variables: dict | None = None) -> dict:
    """Inference figures; `variables` default to a fresh init with train-mode BN statistics."""
    config = bench_config(args)
    model = create_model(config)
    if variables is None:
        variables = _eval_variables(model, args)
    rng = np.random.default_rng(args.seed + 3)
    size = args.image_size
    depth = max(args.full_slices, args.slices, args.stride1_slices, 1)
    image, mask = synthetic_slices(depth, size, size, rng)
    volume, mask = image.transpose(1, 2, 0), mask.transpose(1, 2, 0)  # (H, W, D)
    out: dict = {"dtype": args.infer_dtype, "forward_batch": args.infer_batch}

    # Pure forward throughput on the sliding-window patches of one slice (stride 1).
    devices = jax.local_devices()
    forward = heatmaps.make_patch_forward(model, args.patch_size, args.infer_dtype, devices)
    repl = parallel.replicated(parallel.create_mesh(devices))
    padded = jax.device_put(patches.pad_slices(jnp.asarray(image[:1]), args.patch_size), repl)
    position = jax.device_put(np.full((1,), 50.0, np.float32), repl)
    variables = jax.device_put(variables, repl)
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    centres = np.stack([np.zeros(size * size), ys.ravel(), xs.ravel()], 1).astype(np.int32)
    batch = args.infer_batch * len(devices)
    need = batch * (args.infer_reps + 1)
    centres = np.tile(centres, (math.ceil(need / len(centres)), 1))
    jax.block_until_ready(forward(variables, padded, position, centres[:batch]))
    times = []
    for r in range(1, args.infer_reps + 1):
        chunk = centres[r * batch : (r + 1) * batch]
        t0 = time.perf_counter()
        jax.block_until_ready(forward(variables, padded, position, chunk))
        times.append(time.perf_counter() - t0)
    t = _summary(times)
    out.update(
        forward_batch_global=batch,
        forward_batches_timed=args.infer_reps,
        forward_batch_s_median=t["median"],
        infer_patches_per_s=batch / t["median"],
        infer_patches_per_s_mean=batch / t["mean"],
        infer_patches_per_s_best=batch / t["min"],
    )
    log(f"  eval forward: {batch} patches, median {t['median']:.3f}s -> "
        f"{out['infer_patches_per_s']:.0f} patches/s")  # fmt: skip

    for key, slices, stride in (
        ("volume", args.slices, args.stride),
        ("volume_stride1", args.stride1_slices, 1),
    ):
        if slices > 0:
            r = _run_volume(model, variables, volume, mask, args, slices, stride)
            out[key] = r
            msg = f"  volume {size}x{size}x{slices} stride {stride}: {r['patches']} patches, "
            msg += f"{r['heatmap_s']:.2f}s heatmap + {r['postprocess_s']:.2f}s post-processing"
            if "extrapolated_full_volume_wall_s" in r:
                msg += (
                    f" (EXTRAPOLATED to {args.full_slices} slices: "
                    f"{r['extrapolated_full_volume_wall_s']:.1f}s)"
                )
            log(msg)
    return out


# --- (c) input pipeline ---------------------------------------------------------------------------


def bench_pipeline(args) -> dict:
    """Slices/s from a tfds build of a small generated dataset (embedded default, 96x96x48)."""
    import tensorflow_datasets as tfds

    from data_prep import demo_data
    from experiments import demo
    from p2l import input_pipeline

    tfds.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="p2l_bench_"))
    try:
        t0 = time.perf_counter()
        demo_data.write_demo_dataset(
            root, seed=args.seed, n_train=args.pipeline_volumes, n_val=1, n_test=1, n_ixi_test=1
        )
        config = demo.get_config()
        config.data_root = str(root / "data")
        config.splits_dir = str(root / "splits")
        config.tfds_dir = str(root / "tfds")
        config.sampling.slices_per_step = args.pipeline_volumes
        t1 = time.perf_counter()
        builder = input_pipeline.build_dataset(config)
        t2 = time.perf_counter()
        shape = tuple(config.data.image_shape)
        bank = input_pipeline.load_slice_bank(builder, "train", shape)
        t3 = time.perf_counter()
        config.num_steps = args.pipeline_batches
        count = 0
        t4 = time.perf_counter()
        for batch in input_pipeline.train_batches(bank, config, config.sampling.slices_per_step, 0):
            count += batch["image"].shape[0]
        t5 = time.perf_counter()
        read = bank.num_rows * bank.num_slices
        return {
            "image_shape": list(shape),
            "volumes": bank.num_rows,
            "generate_s": t1 - t0,
            "build_s": t2 - t1,
            "read_slices": read,
            "read_slices_per_s": read / (t3 - t2),
            "batch_slices": count,
            "batch_slices_per_s": count / (t5 - t4),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- (d) training feed: slices/s delivered vs consumed --------------------------------------------

# A reference-size step (~11.5k valid patches of 356 slices) on an H100: ~10-20 ms. The feed should
# deliver >= FEED_TARGET x what the fastest of them consumes, so the GPU never waits on input.
FASTEST_STEP_S = 0.010
FEED_TARGET = 3.0


def _synthetic_bank(rows: int, depth: int, size: int, seed: int):
    """A (rows, depth, size, size) SliceBank tiled from 64 synthetic slices (cheap to make)."""
    from p2l import input_pipeline

    pool, mask = synthetic_slices(64, size, size, np.random.default_rng(seed))
    which = np.arange(rows * depth) % len(pool)
    shape = (rows, depth, size, size)
    return input_pipeline.SliceBank(
        pool[which].reshape(shape),
        mask.astype(np.uint8)[which].reshape(shape),
        [str(r) for r in range(rows)],
    )


def _time_feed(feed, warmup: int, count: int) -> float:
    """Seconds per batch of an iterator of global batches, each waited for on the devices."""
    for _ in range(warmup):
        jax.block_until_ready(next(feed))
    t0 = time.perf_counter()
    for _ in range(count):
        jax.block_until_ready(next(feed))
    return (time.perf_counter() - t0) / count


def pipeline_throughput(
    shrink: bool = False,
    *,
    args: argparse.Namespace | None = None,
    step_s: float | None = None,
    measure_step: bool = True,
) -> dict:
    """Training slices/s the host and device paths deliver (p2l.device_slices) vs consumption.

    Sizes are bench's (`args`, default parse_args([]); `shrink`: tiny ones, a check of the
    script). The bank has --feed-rows rows (387: an IXI train fold) of --feed-depth slices (100
    on an accelerator, 10 on CPU to spare host memory; the gather does not depend on it).
    Consumption is slices per step over `step_s`, the median train-step time (bench_train),
    measured here when not given and `measure_step`.
    """
    from p2l import device_slices

    if args is None:
        tiny = "--image-size 48 --patch-size 8 --patches 64 --train-slices 8 --steps 2 --warmup 1"
        tiny += " --feed-rows 16 --feed-depth 4 --pipeline-batches 3"
        args = parse_args(tiny.split() if shrink else [])
    on_cpu = jax.default_backend() == "cpu"
    rows = args.feed_rows
    depth = args.feed_depth or (10 if on_cpu else 100)
    batches = args.pipeline_batches
    mesh = parallel.create_mesh()
    if step_s is None and measure_step:
        step_s = bench_train(args, mesh)[0]["step_s_median"]
    config = bench_config(args)
    config.seed = args.seed
    config.sampling.slices_per_step = args.train_slices
    config.num_steps = 2 + batches
    padded = parallel.padded_size(args.train_slices, mesh.devices.size)
    bank = _synthetic_bank(rows, depth, args.image_size, args.seed)
    host_s = _time_feed(device_slices.host_batches(bank, config, padded, 0, mesh), 2, batches)
    t0 = time.perf_counter()
    dbank = device_slices.place(bank, mesh)
    jax.block_until_ready((dbank.image, dbank.mask_one))
    place_s = time.perf_counter() - t0
    device_s = _time_feed(device_slices.device_batches(dbank, config, padded, 0, mesh), 2, batches)
    n = args.train_slices
    consumed = n / step_s if step_s else None
    fastest = n / FASTEST_STEP_S
    out = {
        "slices_per_step": n,
        "image_size": args.image_size,
        "bank_shape": [rows, depth, args.image_size, args.image_size],
        "bank_gib_per_device": device_slices.bank_bytes(bank) / 2**30,
        "batches_timed": batches,
        "host_slices_per_s": n / host_s,
        "device_slices_per_s": n / device_s,
        "device_place_s": place_s,
        "step_s_median": step_s,
        "step_consumes_slices_per_s": consumed,
        "fastest_step_s": FASTEST_STEP_S,
        "fastest_step_consumes_slices_per_s": fastest,
        "target_ratio": FEED_TARGET,
        "auto_choice": list(device_slices.choose_for(config, bank, mesh)),
    }
    for path in ("host", "device"):
        out[f"{path}_vs_step"] = out[f"{path}_slices_per_s"] / consumed if consumed else None
        out[f"{path}_vs_fastest_step"] = out[f"{path}_slices_per_s"] / fastest
    # On the path "auto" takes here (on CPU the host: p2l.device_slices.choose).
    out["meets_target"] = out[f"{out['auto_choice'][0]}_vs_fastest_step"] >= FEED_TARGET
    return out


# --- main -----------------------------------------------------------------------------------------


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--patches", type=int, default=1024, help="valid patches per train step")
    ap.add_argument("--patch-size", type=int, default=24, help="square patch side")
    ap.add_argument("--image-size", type=int, default=192, help="square slice side")
    ap.add_argument("--train-slices", type=int, default=356, help="slices per train step")
    ap.add_argument("--steps", type=int, default=8, help="timed train steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up train steps")
    ap.add_argument("--infer-batch", type=int, default=1024, help="patches per forward per device")
    ap.add_argument("--infer-reps", type=int, default=10, help="timed forward batches")
    ap.add_argument("--infer-dtype", choices=heatmaps.DTYPES, default="float32")
    ap.add_argument("--train-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--conv-impl", choices=layers.CONV_IMPLS, default="auto")
    ap.add_argument("--matmul-precision", choices=layers.MATMUL_PRECISIONS, default="default")
    ap.add_argument("--stride", type=int, default=4, help="stride of the first volume timing")
    ap.add_argument(
        "--slices",
        type=int,
        default=None,
        help="slices timed at --stride (0 skips; default: all on an accelerator, 12 on CPU)",
    )
    ap.add_argument(
        "--stride1-slices",
        type=int,
        default=None,
        help="slices timed at stride 1 (0 skips; default: all on an accelerator, 2 on CPU)",
    )
    ap.add_argument("--full-slices", type=int, default=100, help="slices of a full volume")
    ap.add_argument("--rejection-rate", type=float, default=0.2)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--pipeline-volumes", type=int, default=4, help="volumes of the tfds build")
    ap.add_argument("--pipeline-batches", type=int, default=24, help="batches iterated")
    ap.add_argument("--feed-rows", type=int, default=387, help="rows of the training-feed bank")
    ap.add_argument(
        "--feed-depth",
        type=int,
        default=None,
        help="slices per row of the training-feed bank (default: 100 on an accelerator, 10 on CPU)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-xla-flags",
        action="store_true",
        help="do not add p2l.xla_flags.CPU_FLAGS (for A/B runs)",
    )
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-infer", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--dae-width", type=int, default=64, help="DAE U-Net base width (64: theirs)")
    ap.add_argument("--dae-slices", type=int, default=16, help="DAE slices per train step")
    ap.add_argument("--dae-steps", type=int, default=3, help="timed DAE train steps")
    ap.add_argument("--skip-dae", action="store_true", help="no DAE figures (benchmarks.dae_bench)")
    args = ap.parse_args(argv)
    positive = "patches patch_size image_size train_slices steps infer_batch infer_reps stride"
    positive += " full_slices pipeline_volumes pipeline_batches feed_rows dae_width dae_slices"
    positive += " dae_steps"
    for name in positive.split():
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.feed_depth is not None and args.feed_depth < 1:
        ap.error("--feed-depth must be >= 1")
    if args.feed_rows < args.train_slices:
        ap.error("--feed-rows must be >= --train-slices (one step takes that many rows)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_xla_flags:
        xla_flags.apply()  # before the first JAX call below starts the backend
    on_cpu = jax.default_backend() == "cpu"
    if args.slices is None:
        args.slices = 12 if on_cpu else args.full_slices
    if args.stride1_slices is None:
        args.stride1_slices = 2 if on_cpu else args.full_slices
    mesh = parallel.create_mesh()
    dev = jax.devices()[0]
    result = {
        "impl": "p2l",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "device_name": cpu_model_name() if dev.platform == "cpu" else dev.device_kind,
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "patch_size": args.patch_size,
        "image_size": args.image_size,
        "conv_impl": args.conv_impl,
        "conv_impl_resolved": layers.resolve_conv_impl(args.conv_impl),
        "matmul_precision": args.matmul_precision,
        "train_dtype": args.train_dtype,
        "dtype": args.infer_dtype,
    }
    log(
        f"p2l bench: jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} "
        f"({jax.default_backend()}), patch {args.patch_size}, image {args.image_size}"
    )
    t_all = time.perf_counter()
    if not args.skip_train:
        log(f"(a) training: {args.patches} valid patches/step, {args.warmup} warm-up + "
            f"{args.steps} timed steps")  # fmt: skip
        tr, trained = bench_train(args, mesh)
        result["train"] = tr
        log(f"  -> {tr['train_patches_per_s']:.1f} valid patches/s (median step, incl. sampling)")
    if not args.skip_infer:
        log(f"(b) inference ({args.infer_dtype})")
        # The trained variables: BatchNorm statistics of real steps, no second compilation.
        result["infer"] = bench_infer(args, None if args.skip_train else trained)
    if not args.skip_pipeline:
        log("(c) input pipeline (tfds build of generated data)")
        try:
            # tfds prints its progress to stdout: keep stdout for the JSON line alone.
            with contextlib.redirect_stdout(sys.stderr):
                result["pipeline"] = bench_pipeline(args)
        except Exception as err:  # the figure is optional; the reason is kept in the JSON
            log(f"  input pipeline benchmark failed: {err!r}")
            result["pipeline"] = None
            result["pipeline_error"] = repr(err)
        log("(d) training feed: host and device paths vs the train step (p2l.device_slices)")
        step_s = None if args.skip_train else result["train"]["step_s_median"]
        feed = pipeline_throughput(args=args, step_s=step_s, measure_step=False)
        result["feed"] = feed
        log(f"  -> host {feed['host_slices_per_s']:.0f}, device {feed['device_slices_per_s']:.0f} "
            f"slices/s; a {FASTEST_STEP_S * 1e3:.0f} ms step consumes "
            f"{feed['fastest_step_consumes_slices_per_s']:.0f}, this machine's step "
            f"{feed['step_consumes_slices_per_s'] or 0:.0f}")  # fmt: skip
    if not args.skip_dae:
        from benchmarks import dae_bench

        log(f"(e) DAE (width {args.dae_width}, {args.dae_slices} slices/step): train and inference")
        result["dae"] = dae_bench.bench_dae(args, mesh, log)
        log(f"  -> train {result['dae']['train_slices_per_s']:.1f} slices/s, inference "
            f"{result['dae']['infer_slices_per_s']:.1f} slices/s")  # fmt: skip
    result["total_wall_s"] = time.perf_counter() - t_all
    # ru_maxrss is in KiB on Linux.
    result["peak_host_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
