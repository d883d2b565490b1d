"""One process at a time per workdir: an exclusive `flock` on `<workdir>/.lock`, held while
training or evaluation runs, with the holder (pid, host, start, command) written in the file.

The kernel drops the lock when its process dies, however it dies, so a lock left by a dead process
is simply free; the note it left tells who that was, and is replaced. A clean release empties
the file. Multi-process runs lock from process 0 only (the others write nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from p2l.errors import DataError

FILENAME = ".lock"
_held: dict[str, int] = {}  # realpath -> re-entry count, for this process's locks


class WorkdirBusy(DataError):
    """Another process holds the workdir."""


def describe(info: dict) -> str:
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('purpose', '?')}, "
        f"since {info.get('started', '?')})"
    )


def _read_note(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        note = json.loads(text)
        return note if isinstance(note, dict) else {"note": text[:200]}
    except ValueError:
        return {"note": text[:200]}


def _acquire(workdir: Path, purpose: str) -> int | None:
    file = workdir / FILENAME
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise DataError(file, f"cannot create the workdir lock: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        note = _read_note(fd)
        os.close(fd)
        holder = describe(note) if "pid" in note else "a process that has not written its note yet"
        raise WorkdirBusy(
            workdir,
            f"in use by another p2l process: {holder}. Wait for it to finish, stop it (SIGTERM: "
            "it checkpoints and exits), or use another --workdir",
        ) from None
    except OSError as err:  # a file system without locks (some network mounts)
        os.close(fd)
        print(f"p2l: warning: {file}: cannot lock ({err.strerror or err}); nothing stops a "
              "second process from using this workdir", file=sys.stderr, flush=True)  # fmt: skip
        return None
    previous = _read_note(fd)
    if previous:
        print(f"p2l: {file} was left by {describe(previous)}, which is no longer running; "
              "taking it over", flush=True)  # fmt: skip
    note = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "purpose": purpose,
        "argv": sys.argv,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
    return fd


@contextlib.contextmanager
def hold(workdir: str | Path, purpose: str, create: bool = True) -> Iterator[None]:
    """Holds the workdir for the block; WorkdirBusy at once when another process holds it.

    Re-entrant within a process (p2l.main holds it around training, which takes it again).
    With create=False a workdir that does not exist is not created, and not locked.
    """
    workdir = Path(workdir)
    if create:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(workdir, f"cannot create the workdir: {err.strerror or err}") from None
    elif not workdir.is_dir():
        yield
        return
    key = os.path.realpath(workdir)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _acquire(workdir, purpose)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # empty = released cleanly
            os.close(fd)  # closing drops the flock


def holder(workdir: str | Path) -> str | None:
    """Who seems to hold the workdir now, from the lock's note (for listings; takes no lock):
    a note from a live pid on this host, or from another host, counts."""
    file = Path(workdir) / FILENAME
    try:
        note = json.loads(file.read_text() or "{}")
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or "pid" not in note:
        return None
    if note.get("host") == socket.gethostname():
        try:
            os.kill(int(note["pid"]), 0)
        except ProcessLookupError:
            return None
        except (PermissionError, ValueError, TypeError):
            pass
    return describe(note)
