"""The DAE's throughput for `make bench` (benchmarks.bench, key "dae"), beside Patch2Loc's.

- train: slices/s of the jitted DAE train step (p2l.dae_step.make_dae_train_step), noise
  included, on synthetic brain-like slices, `--dae-slices` slices per step (their batch: 16).
- infer: slices/s of the reconstruction forward (p2l.dae_step.make_reconstruct), and the wall
  time of one `--full-slices` volume scored end to end (p2l.dae_scoring: reconstruction, residual,
  7x7x7 median filter, mask).

At `--dae-width` (64, the faithful U-Net) a CPU step takes seconds; `make bench` on CPU runs the
faithful sizes with few timed steps. The figures are medians over the timed repetitions.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from p2l import dae_model, dae_step, parallel, postprocess


def dae_config(args) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dae = ml_collections.ConfigDict(
        {
            "depth": 4,
            "width": args.dae_width,
            "noise_std": 0.2,
            "noise_res": 16,
            "eval_slices": args.dae_slices,
        }  # fmt: skip
    )
    c.optim = ml_collections.ConfigDict(
        {"learning_rate": 1e-4, "decay_steps": 1000, "weight_decay": 1e-5}
    )
    c.model = ml_collections.ConfigDict({"dtype": "float32"})
    c.eval = ml_collections.ConfigDict(
        {"median_size": postprocess.DEFAULT_MEDIAN_SIZE, "erode_mask_iterations": 0}
    )
    c.data = ml_collections.ConfigDict(
        {"image_shape": (args.image_size, args.image_size, args.full_slices)}
    )
    return c


def _disk_slices(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Brain-like slices: a bright disk with texture (image in [0, 1]), and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    mask = ((yy**2 + xx**2) < 0.7).astype(np.uint8)
    image = (rng.uniform(0.3, 0.8, (n, size, size)) * mask).astype(np.float32)
    return image, np.broadcast_to(mask, (n, size, size)).copy()


def _median_times(fn, warmup: int, reps: int) -> list[float]:
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench_dae(args, mesh, log) -> dict:
    config = dae_config(args)
    devices = mesh.devices.size
    model = dae_model.create_dae_model(config)
    tx = dae_step.make_dae_optimizer(config)
    state = jax.device_put(
        dae_step.create_dae_state(config, model, tx, jax.random.key(args.seed)),
        parallel.replicated(mesh),
    )
    slices = args.dae_slices
    padded = parallel.padded_size(slices, devices)
    image, mask = _disk_slices(padded, args.image_size, args.seed)
    batch = parallel.to_global(
        {"image": image, "mask_one": mask, "position": np.zeros(padded, np.float32),
         "slice_index": np.arange(padded, dtype=np.int32)}, mesh)  # fmt: skip
    step = dae_step.make_dae_train_step(model, tx, config, slices, mesh)
    key = jax.random.key(args.seed + 1)
    holder = {"state": state, "i": 0}

    def train_once():
        holder["state"], metrics = step(
            holder["state"], batch, jax.random.fold_in(key, holder["i"])
        )
        holder["i"] += 1
        jax.device_get(metrics)

    train_times = _median_times(train_once, args.warmup, args.dae_steps)
    log(f"  dae train: {np.median(train_times):.3f} s/step of {slices} slices")
    variables = {"params": holder["state"].params}
    reconstruct = dae_step.make_reconstruct(model, tuple(mesh.devices.flat))
    x = jax.device_put(image, parallel.batch_sharded(mesh))
    infer_times = _median_times(
        lambda: jax.block_until_ready(reconstruct(variables, x)), 1, args.infer_reps
    )
    from p2l.dae_scoring import DAEScorer

    volume, vmask = _disk_slices(args.full_slices, args.image_size, args.seed + 2)
    volume, vmask = volume.transpose(1, 2, 0).copy(), vmask.transpose(1, 2, 0).astype(np.float32)
    scorer = DAEScorer(config, model, variables)
    scorer("warm-up", volume, vmask)
    t0 = time.perf_counter()
    scorer("volume", volume, vmask)
    volume_s = time.perf_counter() - t0
    log(f"  dae volume ({args.image_size}x{args.image_size}x{args.full_slices}): {volume_s:.2f} s")
    return {
        "width": args.dae_width,
        "depth": 4,
        "params": int(sum(p.size for p in jax.tree_util.tree_leaves(variables["params"]))),
        "image_size": args.image_size,
        "train_slices_per_step": slices,
        "train_step_s_median": float(np.median(train_times)),
        "train_slices_per_s": slices / float(np.median(train_times)),
        "infer_slices_per_s": padded / float(np.median(infer_times)),
        "volume_slices": args.full_slices,
        "volume_s_with_postprocess": volume_s,
    }
