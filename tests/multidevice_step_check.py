"""Run by tests/train_test.py in a subprocess with 8 fake CPU devices (XLA_FLAGS set there).

Prints one JSON line comparing one train step on a 1-device mesh with the same step on an
8-device mesh (batch sharded, state replicated).
"""

import json

import jax
import numpy as np
import optax

from experiments import demo
from p2l import input_pipeline, parallel, train
from p2l.model import create_model


def synthetic_bank(rows=10, slices=6, size=96):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    mask = (((yy - size / 2) / (0.4 * size)) ** 2 + ((xx - size / 2) / (0.33 * size)) ** 2) <= 1
    image = rng.random((rows, slices, size, size), dtype=np.float32) * mask
    mask_one = np.broadcast_to(mask, image.shape).astype(np.uint8)
    return input_pipeline.SliceBank(image, mask_one, [str(i) for i in range(rows)])


def one_step(devices, config, bank):
    mesh = parallel.create_mesh(devices)
    geo = train.step_geometry(
        config, config.sampling.slices_per_step, config.sampling.num_candidates, len(devices)
    )
    model = create_model(config)
    # SGD: the updated parameters are p - lr*g, so they compare the gradients directly
    # (Adam's first step is lr*sign(g), which flips for gradients at rounding level).
    tx = optax.sgd(1e-3)
    state = train.create_train_state(config, model, tx, jax.random.key(0))
    initial = jax.device_get(state)
    state = jax.device_put(state, parallel.replicated(mesh))
    step = train.make_train_step(model, tx, config, geo, mesh)
    rows, slices = input_pipeline.select_train_slices(0, bank.num_rows, geo.slices, 6, 0)
    batch = input_pipeline.assemble_batch(bank, rows, slices, geo.padded_slices)
    state, metrics = step(state, parallel.to_global(batch, mesh), jax.random.key(7))
    return initial, jax.device_get(state), jax.device_get(metrics), geo


def main():
    config = demo.get_config("tiny")
    config.sampling.slices_per_step = 6  # not a multiple of 8: exercises slice padding
    config.sampling.num_candidates = 500
    bank = synthetic_bank()
    devices = jax.devices()
    s0, s1, m1, g1 = one_step(devices[:1], config, bank)
    _, s8, m8, g8 = one_step(devices, config, bank)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])  # noqa: E731
    # Relative difference of the parameter updates (= lr * gradients) and of the BN statistics.
    update1 = flat(s1.params) - flat(s0.params)
    update8 = flat(s8.params) - flat(s0.params)
    update_rel = float(np.linalg.norm(update1 - update8) / np.linalg.norm(update1))
    stats1, stats8 = flat(s1.batch_stats), flat(s8.batch_stats)
    stats_rel = float(np.max(np.abs(stats1 - stats8) / (np.abs(stats1) + 1e-3)))
    print(
        json.dumps(
            {
                "devices": len(devices),
                "padded": [g1.padded_slices, g8.padded_slices],
                "loss": [float(m1["loss"]), float(m8["loss"])],
                "valid": [float(m1["valid_patches"]), float(m8["valid_patches"])],
                "overflow": [float(m1["overflow"]), float(m8["overflow"])],
                "grad_norm": [float(m1["grad_norm"]), float(m8["grad_norm"])],
                "update_rel_diff": update_rel,
                "batch_stats_rel_diff": stats_rel,
            }
        )
    )


if __name__ == "__main__":
    main()
