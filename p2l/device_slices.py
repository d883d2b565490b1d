"""Training batches gathered on the accelerators from a device-resident copy of the slice bank.

The host path (p2l.input_pipeline.train_batches) copies each step's slices out of the host bank
and ships them to the devices: ~66 MB per reference step (356 slices of 192x192 float32 + uint8),
which one host thread cannot assemble and transfer at the ~20k slices/s a GPU step consumes. Here
the training fold's bank is placed once on every device (replicated: a full IXI fold of 387 rows x
100 slices x 192x192 is 5.7 GB float32 + 1.4 GB uint8 = 6.6 GiB per device), and a step only sends
its (row, slice) indices — a pure function of (seed, step) computed on the host — from which each
device gathers its shard of the batch inside `jit`. The batch is bit-identical to
`input_pipeline.assemble_batch`'s: same rows, same zero padding, same `position` and `slice_index`.

`c.data.device_slices` chooses: "device", "host", or "auto" (see `choose`). Multi-process runs
take the host path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from p2l import input_pipeline, parallel, patches
from p2l.config_check import DEVICE_SLICES
from p2l.errors import ConfigError

# "auto" places the bank when it takes at most this share of a device's free memory: the rest is
# left to the train step (patch buffers, activations, the gathered batch) and XLA's workspace.
FREE_FRACTION = 0.5


def bank_bytes(bank: input_pipeline.SliceBank) -> int:
    """Bytes of one device copy of the bank (image float32 + mask_one uint8)."""
    return bank.image.nbytes + bank.mask_one.nbytes


def _free_bytes(device) -> int | None:
    stats = device.memory_stats()  # None on CPU; bytes_limit/bytes_in_use on GPU and TPU
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def choose(setting: str, bank_size: int, devices) -> tuple[str, str]:
    """("device" | "host", why) for `c.data.device_slices` = setting and a bank of bank_size bytes.

    "auto" takes the device path when the run is single-process and the bank fits in
    FREE_FRACTION of the smallest free memory of the devices; otherwise the host path.
    """
    gib = f"{bank_size / 2**30:.2f} GiB"
    multi = jax.process_count() > 1
    if setting not in DEVICE_SLICES:
        raise ConfigError("data.device_slices", f"{setting!r}; expected auto, device or host")
    if setting == "host":
        return "host", "data.device_slices=host"
    if setting == "device":
        if multi:
            raise ConfigError(
                "data.device_slices", "'device' needs a single-process run; use 'auto' or 'host'"
            )
        return "device", f"data.device_slices=device, {gib} per device"
    # Multi-process runs stream from the host: each process assembles only its share of the rows
    # (parallel.process_rows), so host throughput grows with the hosts, and a replicated bank
    # would need every process's copy placed on every device of the global mesh (not done here).
    if multi:
        return "host", f"auto: {jax.process_count()} processes stream their rows from the host"
    free = [_free_bytes(d) for d in devices]
    if any(f is None for f in free):
        # CPU: the "device" is host memory, so a second copy (one per fake device) only costs
        # memory; both paths deliver far more slices/s than a CPU step consumes (README).
        return "host", f"auto: {devices[0].platform} devices report no memory limit"
    least = min(free)
    if bank_size > FREE_FRACTION * least:
        return "host", (
            f"auto: bank {gib} > {FREE_FRACTION:.0%} of the free {least / 2**30:.1f} GiB per device"
        )
    return "device", f"auto: bank {gib} per device, {bank_size / least:.0%} of free memory"


@dataclass
class DeviceBank(input_pipeline.BankShape):
    """The bank's arrays replicated on every device of a mesh."""

    image: jax.Array
    mask_one: jax.Array


def place(bank: input_pipeline.SliceBank, mesh: Mesh) -> DeviceBank:
    """Copies the bank to every device of `mesh` (single process)."""
    repl = parallel.replicated(mesh)
    return DeviceBank(jax.device_put(bank.image, repl), jax.device_put(bank.mask_one, repl))


def make_gather(mesh: Mesh, num_valid: int):
    """jit(image_bank, mask_bank, rows, slices, slice_index) -> (image, mask_one), sharded.

    Each device gathers its own rows from its own copy (shard_map: no communication). Rows whose
    global `slice_index` is >= num_valid are the batch padding and come out zero, as on the host.
    """

    def local(image, mask_one, rows, slices, slice_index):
        valid = (slice_index < num_valid)[:, None, None]
        return (
            jnp.where(valid, image[rows, slices], jnp.zeros((), image.dtype)),
            jnp.where(valid, mask_one[rows, slices], jnp.zeros((), mask_one.dtype)),
        )

    data = PartitionSpec(parallel.DATA_AXIS)
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(), data, data, data),
        out_specs=(data, data),
    )
    return jax.jit(sharded)


def step_indices(rows: np.ndarray, slices: np.ndarray, num_slices: int, padded: int) -> dict:
    """The small per-step host arrays: indices padded to `padded`, position, slice_index."""
    n = len(rows)
    out = {
        "rows": np.zeros((padded,), np.int32),
        "slices": np.zeros((padded,), np.int32),
        "position": np.zeros((padded,), np.float32),
        "slice_index": np.arange(padded, dtype=np.int32),
    }
    out["rows"][:n] = rows
    out["slices"][:n] = slices
    # On the host, as assemble_batch, so the float rounding is the same (spec §3.1).
    out["position"][:n] = patches.slice_position(slices, num_slices)
    return out


def device_batch(dbank: DeviceBank, gather, indices: dict, mesh: Mesh) -> dict:
    """The global training batch of one step's indices (see step_indices)."""
    small = parallel.to_global(indices, mesh)
    image, mask_one = gather(
        dbank.image, dbank.mask_one, small["rows"], small["slices"], small["slice_index"]
    )
    return {
        "image": image,
        "mask_one": mask_one,
        "position": small["position"],
        "slice_index": small["slice_index"],
    }


def device_batches(
    dbank: DeviceBank, config, padded: int, start: int, mesh: Mesh
) -> Iterator[dict]:
    """Global training batches for steps start..num_steps-1, gathered on the devices.

    The host part is a permutation lookup (input_pipeline.select_train_slices) and a transfer of
    4 x `padded` numbers; the gather is dispatched asynchronously, so it overlaps the previous step.
    """
    batch = config.sampling.slices_per_step
    input_pipeline.steps_per_epoch(dbank.num_rows, batch)  # fail early with a clear message
    gather = make_gather(mesh, batch)
    for step in range(start, config.num_steps):
        rows, slices = input_pipeline.select_train_slices(
            step, dbank.num_rows, batch, dbank.num_slices, config.seed
        )
        yield device_batch(
            dbank, gather, step_indices(rows, slices, dbank.num_slices, padded), mesh
        )


def host_batches(
    bank: input_pipeline.SliceBank, config, padded: int, start: int, mesh: Mesh
) -> Iterator[dict]:
    """Global training batches assembled on the host (tf.data) and shipped each step."""
    for local in input_pipeline.train_batches(bank, config, padded, start):
        yield parallel.to_global(local, mesh)


def choose_for(config, bank: input_pipeline.SliceBank, mesh: Mesh) -> tuple[str, str]:
    """`choose` for a config's training bank on a mesh."""
    setting = config.data.get("device_slices", "auto")  # configs of older runs lack it
    return choose(setting, bank_bytes(bank), list(mesh.devices.flat))


def train_feed(
    bank: input_pipeline.SliceBank, config, padded: int, start: int, mesh: Mesh, path: str
) -> Iterator[dict]:
    """Global training batches from step `start` on `path` ("device" or "host", choose_for)."""
    if path == "device":
        return device_batches(place(bank, mesh), config, padded, start, mesh)
    return host_batches(bank, config, padded, start, mesh)
