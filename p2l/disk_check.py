"""One check before long work (training, evaluation, slice builds): the output folder is writable
and has room, so that a read-only or full disk stops the run at once with one line, not after an
hour of computation with a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from p2l.errors import DataError


def format_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _reason(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "read-only"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "not writable (permission denied)"
    if err.errno == errno.ENOSPC:
        return "disk full"
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        return "not a folder (a file is in the way)"
    return f"not writable ({err.strerror or err})"


def check_writable(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Create `folder` if needed, write and remove a probe file, and require `needed_bytes` free.

    `what` names the work in the message ("the build", "training"). Raises DataError naming the
    folder. The estimate is the caller's; 0 skips the space check.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".p2l_write_probe_", dir=folder)
        try:
            os.write(fd, b"p2l")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise DataError(folder, f"{_reason(err)} — {what} cannot write here") from None
    if needed_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes:
            raise DataError(
                folder,
                f"{format_bytes(free)} free, {what} needs about {format_bytes(needed_bytes)}",
            )
