"""The record of a slice build's input files (size, mtime and sha256 of each), kept in the build.

A build is reused only while its inputs are the ones it was made from. Re-checking costs one
`stat` per file; a file is hashed again only when its size or mtime changed, or when it was
modified so close to the last check that a coarse file-system clock could hide a later change
("racy" files, as git calls them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from p2l.atomic_write import write_json_atomic
from p2l.errors import DataError

logger = logging.getLogger(__name__)

RECORD_NAME = "p2l_inputs.json"
_FORMAT = 1
# Coarsest mtime resolution in common use (FAT: 2 s; ext3 and some NFS servers: 1 s).
_RACY_NS = 2_000_000_000
_CHUNK = 1 << 20
# sha256 releases the GIL on large blocks; threads also hide network file-system latency.
_HASH_THREADS = 4
_LISTED = 3


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_all(paths: Sequence[str]) -> list[str]:
    with ThreadPoolExecutor(min(_HASH_THREADS, max(1, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))


def fingerprint(paths: Iterable[str]) -> dict:
    """The record of `paths` as they are now, every file hashed (before the build reads them)."""
    paths = sorted(set(paths))
    checked_ns = time.time_ns()  # before the stats: a file modified from now on counts as racy
    stats = {}
    for path in paths:
        try:
            stats[path] = os.stat(path)
        except OSError as err:
            raise DataError(path, f"cannot read input file: {err.strerror or err}") from None
    try:
        hashes = _hash_all(paths)
    except OSError as err:
        raise DataError(err.filename or "input file", f"cannot read: {err.strerror}") from None
    files = {
        path: {"size": stats[path].st_size, "mtime_ns": stats[path].st_mtime_ns, "sha256": digest}
        for path, digest in zip(paths, hashes, strict=True)
    }
    return {"format": _FORMAT, "checked_ns": checked_ns, "files": files}


def write(build_dir: str | os.PathLike, record: dict) -> None:
    write_json_atomic(Path(build_dir) / RECORD_NAME, record)


@dataclass
class Check:
    """Outcome of comparing a build's record with the files now on disk."""

    stale: str | None = None  # why the build must not be used; None when it may
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # recorded inputs that are absent now


def _listed(paths: list[str]) -> str:
    more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
    return ", ".join(paths[:_LISTED]) + more


def check(build_dir: str | os.PathLike, paths: Iterable[str]) -> Check:
    """Compare the record in `build_dir` with `paths` (stat only, hash only what looks changed)."""
    record_path = Path(build_dir) / RECORD_NAME
    try:
        record = json.loads(record_path.read_text())
        files, checked_ns = record["files"], int(record["checked_ns"])
        if record.get("format") != _FORMAT:
            raise ValueError("unknown format")
    except FileNotFoundError:
        return Check(
            stale="no record of its input files (made by an older p2l, or interrupted before "
            "the record was written)"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return Check(stale=f"its record of input files ({RECORD_NAME}) is unreadable")
    paths = sorted(set(paths))
    now_ns = time.time_ns()
    if set(paths) != set(files):
        return Check(stale="it was made from another list of input files")
    result, to_hash = Check(), []
    for path in paths:
        recorded = files[path]
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            result.missing.append(path)
            continue
        if stat.st_size != recorded["size"]:
            result.changed.append(path)
        elif stat.st_mtime_ns != recorded["mtime_ns"] or stat.st_mtime_ns >= checked_ns - _RACY_NS:
            to_hash.append((path, stat))
    if to_hash:
        hashes = _hash_all([path for path, _ in to_hash])
        refreshed = False
        for (path, stat), digest in zip(to_hash, hashes, strict=True):
            if digest != files[path]["sha256"]:
                result.changed.append(path)
            else:  # same content (touched, or copied back): remember the new stat
                files[path].update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
                refreshed = True
        if refreshed and not result.changed:
            record["checked_ns"] = now_ns  # every file was compared as of now
            _rewrite(build_dir, record)
    if result.changed:
        result.changed.sort()
        result.stale = (
            f"{len(result.changed)} input file(s) changed since it was built: "
            f"{_listed(result.changed)}"
        )
    return result


def _rewrite(build_dir: str | os.PathLike, record: dict) -> None:
    """Best effort: a read-only shared build stays usable, it is only re-hashed next time."""
    try:
        write(build_dir, record)
    except DataError as err:
        logger.debug("not refreshing the input record: %s", err)


def missing_warning(build_dir: str | os.PathLike, missing: list[str]) -> str:
    return (
        f"{build_dir}: {len(missing)} input file(s) of this build are absent "
        f"({_listed(missing)}); using the build made from them"
    )
