"""A full or read-only disk while checkpointing is one clear line (p2l.checkpoint)."""

import errno

import jax.numpy as jnp
import pytest

from p2l import checkpoint
from p2l.errors import DataError


class _TensorstoreLikeError(Exception):
    """orbax surfaces storage failures as non-OSError exceptions with the OS words inside."""


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        _TensorstoreLikeError("WRITE: error writing ...: [OS error: No space left on device]"),
        RuntimeError("commit failed"),  # wrapping a storage error as its cause
    ],
)
def test_a_full_disk_during_a_save_is_one_clear_line(tmp_path, monkeypatch, failure):
    ckpt = checkpoint.Checkpointer(tmp_path)
    if isinstance(failure, RuntimeError):
        failure.__cause__ = OSError(errno.EROFS, "Read-only file system")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ckpt._manager, "save", fail)
    with pytest.raises(DataError, match="cannot write a checkpoint: (No space|Read-only)") as err:
        ckpt.save(1, {"w": jnp.zeros(3)})
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    ckpt.close()


def test_other_errors_pass_through(tmp_path, monkeypatch):
    ckpt = checkpoint.Checkpointer(tmp_path)
    monkeypatch.setattr(ckpt._manager, "save", lambda *a, **k: (_ for _ in ()).throw(KeyError("x")))
    with pytest.raises(KeyError):
        ckpt.save(1, {"w": jnp.zeros(3)})
    ckpt.close()


def test_save_and_restore_round_trip(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(2, {"w": jnp.arange(3.0)})
    ckpt.close()
    assert checkpoint.complete_steps(tmp_path) == [2]
    again = checkpoint.Checkpointer(tmp_path)
    restored = again.restore({"w": jnp.zeros(3)})
    again.close()
    assert restored["w"].tolist() == [0.0, 1.0, 2.0]
