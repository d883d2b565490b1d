"""Atomic file output: readers never see a half-written file, an interrupted write leaves the
old file (or none), never a torn one (brief: "outputs are written atomically").

Every writer of the project goes through `atomic_path`: it yields a temporary name in the target's
folder (same file system, so the final `os.replace` is atomic), and publishes it only when the
body finished without an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from p2l.errors import DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temp file the usual permissions (mkstemp makes it 0600) and move it in."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside `path` for a writer that takes a file name.

    `suffix` keeps the extension writers look at (".nii.gz", ".png"). On success the temp file is
    published onto `path`; on any exception it is removed and the exception propagates, with
    OSErrors (disk full, read-only folder) turned into a DataError that names `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent
        )
        os.close(fd)
    except OSError as err:
        raise DataError(path, f"cannot write: {err.strerror or err}") from None
    try:
        yield Path(tmp)
        publish(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise DataError(path, f"cannot write: {err.strerror or err}") from None
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
