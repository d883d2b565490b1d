"""Checkpoints: the only module that imports orbax (conventions).

Orbax writes each step into a temporary folder (`<step>.orbax-checkpoint-tmp-*`) and renames it
to `<step>` when complete, so a run killed mid-save leaves no checkpoint that looks finished;
`latest_step`, `restore` and `complete_steps` only see complete ones. The run's identity
(`p2l.run_identity`) lives beside the step folders, in `checkpoints/identity.json`.

orbax and jax are imported when a Checkpointer is made, so that tools which only look at run
folders (`p2l.tools.sweep --list`, `p2l.tools.tables`) stay quick.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from p2l.errors import DataError

DIRNAME = "checkpoints"
# Storage failures, as OSError numbers or as words in the messages of the tensorstore errors
# orbax raises (which are not OSErrors): reported in one line, not as a page of traceback.
_IO_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
_IO_WORDS = ("No space left on device", "Read-only file system", "Permission denied",
             "Disk quota exceeded")  # fmt: skip


def storage_problem(err: BaseException) -> str | None:
    """What went wrong with the storage, if `err` (or an exception it came from) says so."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _IO_ERRNOS:
            return err.strerror or str(err)
        found = next((w for w in _IO_WORDS if w in str(err)), None)
        if found:
            return found
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _writing(directory: Path) -> Iterator[None]:
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a storage failure
        problem = storage_problem(err)
        if problem is None:
            raise
        raise DataError(
            directory,
            f"cannot write a checkpoint: {problem}. The latest complete checkpoint is kept; "
            "free space (or fix permissions) and run the same command to resume",
        ) from None


def complete_steps(workdir: str | Path) -> list[int]:
    """The steps of the complete checkpoints in `workdir`, ascending, without starting orbax."""
    directory = Path(workdir) / DIRNAME
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


class Checkpointer:
    """Save / restore the train state pytree under <workdir>/checkpoints/<step>."""

    def __init__(self, workdir: str | Path, keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(workdir).absolute() / DIRNAME
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        with _writing(self.directory):
            self._manager.save(step, args=self._ocp.args.StandardSave(state), force=True)

    def restore(self, state_like: Any, step: int | None = None) -> Any:
        """Restore into the structure, shapes and shardings of `state_like`; a checkpoint of
        another shape (patch size, architecture) is a DataError naming its folder."""
        import jax

        step = self._manager.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_like
        )
        try:
            return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                self.directory / str(step),
                "checkpoint does not match this config's model (another patch size or "
                f"architecture?): {str(err).splitlines()[0][:300]}",
            ) from None

    def close(self) -> None:
        # Saves are asynchronous: a full disk may only show here.
        with _writing(self.directory):
            self._manager.wait_until_finished()
            self._manager.close()
