"""Per-dataset readers of the providers' raw layouts, and the output layout (spec §1.1, §1.2, §2.1).

Raw layouts recognised (RAW is searched recursively):
- ixi: `IXI<nnn>-<Site>-<nnnn>-T1.nii.gz` / `-T2.nii.gz`, extracted or still inside the provider's
  `IXI-T1.tar` / `IXI-T2.tar` (extracted files win over tar members).
- brats21: case folders `BraTS2021_<nnnnn>/` with `<case>_t1`, `_t2`, `_seg` `.nii.gz` (BraTS 2023
  names `-t1n`, `-t2w`, `-seg` are accepted too). Already skull-stripped.
- mslub: folders `patient<nn>/` holding `[patient<nn>_]T1W`, `T2W`, `consensus_gt` `.nii.gz` (the
  Ljubljana release) or the open_ms_data derivatives `T1_...`, `T2_...`, `GOLD_STANDARD_...`; the
  `_brain_` derivatives are already skull-stripped.
- atlas_v2: BIDS `sub-*/ses-*/anat/<id>_T1w.nii.gz` with `<id>_label-L_desc-T1lesion_mask.nii.gz`.
- wmh: challenge folders `<Site>/<n>/pre/T1.nii.gz` with `<Site>/<n>/wmh.nii.gz` (the T1 already
  resampled to the FLAIR grid, like the segmentation); subject id `<Site>_<n>` (e.g. `GE3T_137`).

Output layout, readable by `p2l.splits` (`/Train/ixi/t1/<id>_t1.nii.gz`, `/Test/<Dataset>/...`):
`<folder>/<mod>/<id>_<mod>.nii.gz`, `<folder>/mask_<mod>/<id>_mask.nii.gz` and, with lesions,
`<folder>/seg_<mod>/<id>_seg.nii.gz`: one mask and one seg per modality, because T1 and T2 are
registered independently (the reference overwrote T1 masks with T2 ones, spec §2.1). `mask/` and
`seg/` (the paths in the split CSVs) hold hard links to one modality's files: the first prepared
one in `MaskPreference` (T1 for IXI as the CSVs name T1 files; T2 for BraTS21 and MSLUB, the
modality the paper evaluates them on).

Segmentation labels: every label > 0 is lesion (the reference's `seg > 0`, spec §2.2): BraTS
{1, 2, 4} -> whole tumour; WMH label 2 ("other pathology") is lesion too, unless
`--exclude-labels 2`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from p2l.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_NII = r"\.nii(?:\.gz)?"


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


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset's raw layout and where its outputs go."""

    key: str
    folder: str  # relative to the output root: "Train/ixi", "Test/Brats21", ...
    modalities: tuple[str, ...]  # supported modalities, paper modality first
    default_modalities: tuple[str, ...]
    mask_preference: tuple[str, ...]  # whose mask/seg is linked into mask/ and seg/
    has_seg: bool
    # True: a subject lacking a requested modality is fine (not every IXI subject has a T2).
    modality_optional: bool
    discover: Callable[[Path], list[Subject]] = field(repr=False)
    layout_help: str = ""


def output_paths(root: Path, spec: DatasetSpec, subject_id: str, modality: str) -> dict[str, Path]:
    """Per-modality output files of one scan (`seg` only for datasets with lesions)."""
    folder = Path(root) / spec.folder
    paths = {
        "image": folder / modality / f"{subject_id}_{modality}.nii.gz",
        "mask": folder / f"mask_{modality}" / f"{subject_id}_mask.nii.gz",
    }
    if spec.has_seg:
        paths["seg"] = folder / f"seg_{modality}" / f"{subject_id}_seg.nii.gz"
    return paths


def shared_paths(root: Path, spec: DatasetSpec, subject_id: str) -> dict[str, Path]:
    """The single-mask layout of the split CSVs: `mask/<id>_mask.nii.gz`, `seg/<id>_seg.nii.gz`."""
    folder = Path(root) / spec.folder
    paths = {"mask": folder / "mask" / f"{subject_id}_mask.nii.gz"}
    if spec.has_seg:
        paths["seg"] = folder / "seg" / f"{subject_id}_seg.nii.gz"
    return paths


def _files(raw: Path) -> list[Path]:
    return sorted(p for p in raw.rglob("*") if p.is_file() and not p.name.startswith("."))


# --- IXI ------------------------------------------------------------------------------------------
_IXI = re.compile(rf"^(IXI\d{{3}}-[A-Za-z]+-\d{{4}})-(T1|T2){_NII}$")


def discover_ixi(raw: Path) -> list[Subject]:
    """IXI subjects from extracted files and/or the provider's tar archives."""
    extracted: dict[tuple[str, str], list[Source]] = {}
    archived: dict[tuple[str, str], list[Source]] = {}
    for path in _files(raw):
        match = _IXI.match(path.name)
        if match:
            key = (match.group(1), match.group(2).lower())
            extracted.setdefault(key, []).append(Source(str(path)))
        elif path.name.endswith((".tar", ".tar.gz", ".tgz")):
            for name in _tar_index(str(path)):
                match = _IXI.match(Path(name).name)
                if match:
                    key = (match.group(1), match.group(2).lower())
                    archived.setdefault(key, []).append(Source(str(path), name))
    both = sorted(set(extracted) & set(archived))
    if both:
        logger.info(
            "%d IXI scans exist both extracted and in a tar: using the extracted files", len(both)
        )
    chosen = {**archived, **extracted}
    return _group(chosen, already_stripped=False)


def _group(
    found: dict[tuple[str, str], list[Source]],
    already_stripped: bool | Callable[[Source], bool],
    segs: dict[str, list[Source]] | None = None,
) -> list[Subject]:
    ids = sorted({sid for sid, _ in found} | set(segs or {}))
    subjects = []
    for sid in ids:
        images, problems = {}, []
        for (other, modality), sources in sorted(found.items()):
            if other != sid:
                continue
            if len(sources) > 1:
                listed = ", ".join(s.describe() for s in sources)
                problems.append(f"{modality}: {len(sources)} candidate files ({listed})")
            else:
                images[modality] = sources[0]
        seg = None
        if segs is not None:
            candidates = segs.get(sid, [])
            if len(candidates) > 1:
                listed = ", ".join(s.describe() for s in candidates)
                problems.append(f"seg: {len(candidates)} candidate files ({listed})")
            elif candidates:
                seg = candidates[0]
        stripped = (
            already_stripped
            if isinstance(already_stripped, bool)
            else any(already_stripped(s) for s in images.values())
        )
        subjects.append(Subject(sid, images, seg, tuple(problems), stripped))
    return subjects


# --- BraTS 2021 -----------------------------------------------------------------------------------
_BRATS = re.compile(rf"^(?P<id>.+?)[_-](?P<role>t1|t1n|t2|t2w|seg|t1ce|t1c|flair|t2f){_NII}$")
_BRATS_ROLES = {"t1": "t1", "t1n": "t1", "t2": "t2", "t2w": "t2", "seg": "seg"}


def discover_brats21(raw: Path) -> list[Subject]:
    """BraTS case folders: `<case>/<case>_{t1,t2,seg}.nii.gz` (or BraTS 2023 `-t1n/-t2w/-seg`)."""
    found: dict[tuple[str, str], list[Source]] = {}
    segs: dict[str, list[Source]] = {}
    for path in _files(raw):
        match = _BRATS.match(path.name)
        if not match or match.group("role") not in _BRATS_ROLES:
            continue
        role, sid = _BRATS_ROLES[match.group("role")], match.group("id")
        if role == "seg":
            segs.setdefault(sid, []).append(Source(str(path)))
        else:
            found.setdefault((sid, role), []).append(Source(str(path)))
    return _group(found, already_stripped=True, segs=segs)


# --- MSLUB ----------------------------------------------------------------------------------------
_MSLUB_DIR = re.compile(r"^patient\d+$", re.IGNORECASE)
_MSLUB_ROLES = {
    "t1": re.compile(rf"^(?:patient\d+_)?(?:T1W|T1_(?!.*POST).*){_NII}$", re.IGNORECASE),
    "t2": re.compile(rf"^(?:patient\d+_)?(?:T2W|T2_.*){_NII}$", re.IGNORECASE),
    "seg": re.compile(rf"^(?:patient\d+_)?(?:consensus_gt|GOLD_STANDARD.*){_NII}$", re.IGNORECASE),
}


def discover_mslub(raw: Path) -> list[Subject]:
    """MSLUB `patient<nn>/` folders (Ljubljana release or open_ms_data derivatives)."""
    found: dict[tuple[str, str], list[Source]] = {}
    segs: dict[str, list[Source]] = {}
    folders = [raw] if _MSLUB_DIR.match(raw.name) else []
    folders += sorted(p for p in raw.rglob("*") if p.is_dir() and _MSLUB_DIR.match(p.name))
    for folder in folders:
        sid = folder.name.lower()
        for path in _files(folder):
            for role, pattern in _MSLUB_ROLES.items():
                if pattern.match(path.name):
                    target = (
                        segs.setdefault(sid, [])
                        if role == "seg"
                        else found.setdefault((sid, role), [])
                    )
                    target.append(Source(str(path)))
    # open_ms_data's `_brain_` derivatives are skull-stripped; the raw release is not.
    return _group(found, lambda s: "_brain" in Path(s.path).name.lower(), segs=segs)


# --- ATLAS v2 -------------------------------------------------------------------------------------
_ATLAS_T1 = re.compile(rf"^(?P<id>sub-[^_]+.*?)_T1w{_NII}$")


def discover_atlas_v2(raw: Path) -> list[Subject]:
    """ATLAS v2 BIDS T1w scans with their `label-L_desc-T1lesion_mask` siblings."""
    found: dict[tuple[str, str], list[Source]] = {}
    segs: dict[str, list[Source]] = {}
    for path in _files(raw):
        match = _ATLAS_T1.match(path.name)
        if not match:
            continue
        sid = match.group("id")
        found.setdefault((sid, "t1"), []).append(Source(str(path)))
        for sibling in sorted(path.parent.glob(f"{sid}_*lesion_mask.nii*")):
            segs.setdefault(sid, []).append(Source(str(sibling)))
    return _group(found, already_stripped=False, segs=segs)


# --- WMH ------------------------------------------------------------------------------------------
def discover_wmh(raw: Path) -> list[Subject]:
    """WMH challenge subjects `<Site>/<n>/pre/T1.nii.gz` + `<Site>/<n>/wmh.nii.gz`."""
    found: dict[tuple[str, str], list[Source]] = {}
    segs: dict[str, list[Source]] = {}
    for path in _files(raw):
        if path.parent.name != "pre" or not re.match(rf"^T1{_NII}$", path.name):
            continue
        subject_dir = path.parent.parent
        sid = f"{subject_dir.parent.name}_{subject_dir.name}"
        found.setdefault((sid, "t1"), []).append(Source(str(path)))
        for candidate in (subject_dir / "wmh.nii.gz", subject_dir / "wmh.nii"):
            if candidate.is_file():
                segs.setdefault(sid, []).append(Source(str(candidate)))
    return _group(found, already_stripped=False, segs=segs)


DATASETS: dict[str, DatasetSpec] = {
    spec.key: spec
    for spec in (
        DatasetSpec(
            "ixi",
            "Train/ixi",
            ("t1", "t2"),
            ("t1", "t2"),
            ("t1", "t2"),
            False,
            True,
            discover_ixi,
            "IXI<nnn>-<Site>-<nnnn>-T1.nii.gz / -T2.nii.gz, or IXI-T1.tar / IXI-T2.tar",
        ),
        DatasetSpec(
            "brats21",
            "Test/Brats21",
            ("t2", "t1"),
            ("t1", "t2"),
            ("t2", "t1"),
            True,
            False,
            discover_brats21,
            "BraTS2021_<nnnnn>/BraTS2021_<nnnnn>_{t1,t2,seg}.nii.gz",
        ),
        DatasetSpec(
            "mslub",
            "Test/MSLUB",
            ("t2", "t1"),
            ("t1", "t2"),
            ("t2", "t1"),
            True,
            False,
            discover_mslub,
            "patient<nn>/[patient<nn>_]{T1W,T2W,consensus_gt}.nii.gz",
        ),
        DatasetSpec(
            "atlas_v2",
            "Test/ATLAS_v2",
            ("t1",),
            ("t1",),
            ("t1",),
            True,
            False,
            discover_atlas_v2,
            "sub-*/ses-*/anat/<id>_T1w.nii.gz + <id>_label-L_desc-T1lesion_mask.nii.gz",
        ),
        DatasetSpec(
            "wmh",
            "Test/WMH",
            ("t1",),
            ("t1",),
            ("t1",),
            True,
            False,
            discover_wmh,
            "<Site>/<n>/pre/T1.nii.gz + <Site>/<n>/wmh.nii.gz",
        ),
    )
}
_ALIASES = {"brats": "brats21", "atlas": "atlas_v2", "atlasv2": "atlas_v2"}


def get_spec(name: str) -> DatasetSpec:
    """The dataset spec for a CLI name (case-insensitive: ixi, brats21, mslub, atlas_v2, wmh)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ConfigError("dataset", f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    return DATASETS[key]


def discover(spec: DatasetSpec, raw: str | os.PathLike) -> list[Subject]:
    """All subjects found under `raw`; DataError when the folder is missing or holds none."""
    raw = Path(raw)
    if not raw.is_dir():
        raise DataError(raw, f"raw {spec.key} folder not found")
    subjects = spec.discover(raw)
    if not subjects:
        raise DataError(
            raw, f"no {spec.key} scans found; expected the provider's layout: {spec.layout_help}"
        )
    return subjects
