"""Raw input files of the dataset adapters: files or tar members, subjects, and the file walk.

Split from `data_prep.adapters` (which re-exports these names) to keep each module short.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from p2l.errors import DataError


@functools.lru_cache(maxsize=8)
def _tar_index(path: str) -> dict[str, tuple[int, int]]:
    """Member name -> (size, mtime) of a tar archive, read once (IXI tars hold ~600 scans)."""
    try:
        with tarfile.open(path) as archive:
            return {m.name: (m.size, int(m.mtime)) for m in archive.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(path, f"cannot read the tar archive: {err}") from err


@dataclass(frozen=True)
class Source:
    """A raw input file: a path, or a member of a tar archive at `path`."""

    path: str
    member: str | None = None

    def describe(self) -> str:
        """Human-readable location, used in errors and the manifest."""
        return self.path if self.member is None else f"{self.path}::{self.member}"

    def identity(self) -> dict:
        """Cheap change detector (path, size, mtime) for restart decisions."""
        if self.member is None:
            stat = os.stat(self.path)
            return {"path": self.path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        size, mtime = _tar_index(self.path)[self.member]
        return {"path": self.path, "member": self.member, "size": size, "mtime": mtime}

    @contextlib.contextmanager
    def local_file(self) -> Iterator[Path]:
        """A readable file path; tar members are extracted to a temporary folder first."""
        if self.member is None:
            if not os.path.isfile(self.path):
                raise DataError(self.path, "input file not found (was it moved during the run?)")
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="p2l_tar_") as tmp:
            target = Path(tmp) / Path(self.member).name
            try:
                with tarfile.open(self.path) as archive:
                    handle = archive.extractfile(self.member)
                    if handle is None:
                        raise DataError(self.describe(), "tar member is not a regular file")
                    with handle, open(target, "wb") as out:
                        shutil.copyfileobj(handle, out)
            except (tarfile.TarError, OSError, EOFError) as err:
                raise DataError(
                    self.describe(), f"cannot extract from the tar archive: {err}"
                ) from err
            yield target


@dataclass(frozen=True)
class Subject:
    """One subject of a raw dataset: its scans per modality, its lesion mask, known problems."""

    subject_id: str
    images: dict[str, Source]
    seg: Source | None = None
    # Why (part of) the subject cannot be prepared: reported as a failure, never dropped silently.
    problems: tuple[str, ...] = ()
    already_stripped: bool = False
    # The subject's own brain mask (label > 0), for `--skull-strip given-mask`; how trustworthy it
    # is goes to the manifest. `mask_is_reference`: `auto` uses it (the dataset's official mask).
    brain_mask: Source | None = None
    brain_mask_note: str = ""
    mask_is_reference: bool = False


def list_files(raw: Path) -> list[Path]:
    """Every non-hidden file under `raw`, following symbolic links to folders (a raw folder that
    links to a read-only copy of the download is the normal case); each real folder once."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(raw, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / f for f in files if not f.startswith(".")]
    return sorted(p for p in found if p.is_file())


def _unique(sources: list[Source], what: str, problems: list[str]) -> Source | None:
    if len(sources) > 1:
        listed = ", ".join(s.describe() for s in sources)
        problems.append(f"{what}: {len(sources)} candidate files ({listed})")
        return None
    return sources[0] if sources else None


def group_subjects(
    found: dict[tuple[str, str], list[Source]],
    already_stripped: bool | Callable[[Source], bool],
    segs: dict[str, list[Source]] | None = None,
    masks: dict[str, list[Source]] | None = None,
    mask_note: str = "",
    mask_is_reference: bool = False,
) -> list[Subject]:
    """Subjects from (id, modality) -> files, id -> lesion files and id -> brain-mask files; more
    than one candidate for a role is a problem of that subject, reported by the run."""
    ids = sorted({sid for sid, _ in found} | set(segs or {}))
    subjects = []
    for sid in ids:
        images, problems = {}, []
        for (other, modality), sources in sorted(found.items()):
            if other == sid and (source := _unique(sources, modality, problems)) is not None:
                images[modality] = source
        seg = _unique((segs or {}).get(sid, []), "seg", problems)
        mask = _unique((masks or {}).get(sid, []), "brain mask", problems)
        stripped = (
            already_stripped
            if isinstance(already_stripped, bool)
            else any(already_stripped(s) for s in images.values())
        )
        subjects.append(
            Subject(
                sid,
                images,
                seg,
                tuple(problems),
                stripped,
                brain_mask=mask,
                brain_mask_note=mask_note if mask is not None else "",
                mask_is_reference=mask_is_reference and mask is not None,
            )
        )
    return subjects
