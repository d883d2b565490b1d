"""Device-gathered training batches against the host's, step by step (p2l.device_slices).

Imported by tests/device_slices_test.py on the test process's device(s), and run there in a
subprocess with 8 fake CPU devices (XLA_FLAGS set there); as a script it prints one JSON line.
"""

import json

import jax
import numpy as np

from p2l import device_slices, input_pipeline, parallel


def synthetic_bank(rows=10, slices=6, size=40, seed=0):
    """Random masked slices; mask_one differs from slice to slice, so a wrong gather shows."""
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, slices, size, size)) < 0.6
    image = rng.random((rows, slices, size, size), dtype=np.float32) * mask
    return input_pipeline.SliceBank(image, mask.astype(np.uint8), [str(i) for i in range(rows)])


def mismatches(mesh, bank, batch: int, steps: int, seed: int) -> list[str]:
    """'step/key' of every batch entry where the device path differs from assemble_batch."""
    padded = parallel.padded_size(batch, mesh.devices.size)
    dbank = device_slices.place(bank, mesh)
    gather = device_slices.make_gather(mesh, batch)
    bad = []
    for step in range(steps):
        rows, slices = input_pipeline.select_train_slices(
            step, bank.num_rows, batch, bank.num_slices, seed
        )
        want = input_pipeline.assemble_batch(bank, rows, slices, padded)
        indices = device_slices.step_indices(rows, slices, bank.num_slices, padded)
        got = device_slices.device_batch(dbank, gather, indices, mesh)
        for key, value in want.items():
            if not got[key].sharding.is_equivalent_to(parallel.batch_sharded(mesh), value.ndim):
                bad.append(f"{step}/{key}: sharding {got[key].sharding}")
            host = np.asarray(jax.device_get(got[key]))
            if host.dtype != value.dtype or not np.array_equal(host, value):
                bad.append(f"{step}/{key}")
    return bad


def main():
    mesh = parallel.create_mesh()
    # 6 of 10 rows on 8 devices: two padding rows, one device holding only padding.
    bad = mismatches(mesh, synthetic_bank(), batch=6, steps=7, seed=3)
    print(json.dumps({"devices": mesh.devices.size, "mismatches": bad}))


if __name__ == "__main__":
    main()
