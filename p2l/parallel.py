"""Device mesh and shardings: data parallelism with `jax.jit` over a ('data',) mesh.

The batch is sharded along its leading axis, the train state replicated (conventions). This is
the supported successor of `pmap`; it spans all processes' devices in multi-host runs.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
    """A 1-D ('data',) mesh over all (global) devices."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def jit_train_step(step, mesh: Mesh):
    """`step(state, batch, key) -> (state, metrics)` jitted over `mesh`: batch sharded, state,
    key and outputs replicated, the input state donated (its buffers become the new state's)."""
    repl, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))  # fmt: skip


def jit_eval_step(step, mesh: Mesh):
    """`step(state, batch, key) -> metrics` jitted over `mesh`: batch sharded, the rest
    replicated."""
    repl = replicated(mesh)
    return jax.jit(step, in_shardings=(repl, batch_sharded(mesh), repl), out_shardings=repl)


def padded_size(n: int, multiple: int) -> int:
    """n rounded up to a multiple (e.g. 356 slices on 8 devices -> 360)."""
    return math.ceil(n / multiple) * multiple


def process_rows(global_rows: int) -> slice:
    """The rows of a global batch this process feeds (contiguous, in process order)."""
    per_process = global_rows // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local rows of a batch -> global arrays sharded along 'data'."""
    sharding = batch_sharded(mesh)
    out = {}
    for name, local in batch.items():
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def process_share(items: list) -> list:
    """This process's items of a list split round-robin across processes (evaluation)."""
    return items[jax.process_index() :: jax.process_count()]


def gather_objects(obj) -> list:
    """Every process's `obj` (any picklable), in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    import pickle

    from jax.experimental import multihost_utils

    payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    everything = multihost_utils.process_allgather(padded)
    return [pickle.loads(everything[i, : int(sizes[i, 0])].tobytes()) for i in range(len(sizes))]
