"""Checkpoints: the only module that imports orbax (conventions).

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves no checkpoint that looks finished; `latest_step` and `restore` only see complete
ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save / restore the train state pytree under <workdir>/checkpoints/<step>."""

    def __init__(self, workdir: str | Path, keep: int = 3):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, state_like: Any, step: int | None = None) -> Any:
        """Restore into the structure, shapes and shardings of `state_like`."""
        step = self._manager.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_like
        )
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
