"""Per-dataset readers of the providers' raw layouts, and the output layout (spec §1.1, §1.2, §2.1).

Raw layouts recognised (RAW is searched recursively, following symbolic links to folders):
- ixi: `IXI<nnn>-<Site>-<nnnn>-T1.nii.gz` / `-T2.nii.gz`, extracted or still inside the provider's
  `IXI-T1.tar` / `IXI-T2.tar` (extracted files win over tar members); also `_T1.nii.gz` (the 2 mm
  Hammersmith copies of NiChart) with `<id>_T1_DLMUSE.nii.gz` anywhere under RAW as the subject's
  given brain mask (a DLMUSE parcellation: a model's output, a pseudo-label).
- brats21: case folders `BraTS2021_<nnnnn>/` with `<case>_t1`, `_t2`, `_seg` `.nii.gz` (BraTS 2023
  names `-t1n`, `-t2w`, `-seg` are accepted too). Already skull-stripped.
- brats15: DeepMedic's BraTS 2015 examples, case folders `brats_*/` with z-scored
  `T1c_subtrMeanDivStd`, `Flair_subtrMeanDivStd`, `brainmask` (the given mask, which `auto` uses)
  and `OTMultiClass` (labels 1-4) `.nii.gz`; modalities t1c, flair; subject id = folder name.
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

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.sources import Source, Subject, _tar_index, group_subjects, list_files
from p2l.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_NII = r"\.nii(?:\.gz)?"


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
    # The brain mask file `--skull-strip given-mask` expects for a subject ({id}: subject id).
    given_mask_help: str = ""
    # Sources are z-scored (negative inside the brain): shifted positive before N4 (deviation).
    zscored: bool = False


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


# --- IXI ------------------------------------------------------------------------------------------
# The provider names `IXI013-HH-1212-T1.nii.gz`; the NiChart 2 mm Hammersmith copies use `_T1`.
_IXI = re.compile(rf"^(IXI\d{{3}}-[A-Za-z]+-\d{{4}})[-_](T1|T2){_NII}$")
_IXI_DLMUSE = re.compile(rf"^(IXI\d{{3}}-[A-Za-z]+-\d{{4}})_T1_DLMUSE{_NII}$")
_DLMUSE_NOTE = "DLMUSE parcellation label > 0: a model's output, pseudo-label"


def discover_ixi(raw: Path) -> list[Subject]:
    """IXI subjects from extracted files and/or the provider's tar archives; a
    `<id>_T1_DLMUSE.nii.gz` anywhere under RAW is that subject's given brain mask."""
    extracted: dict[tuple[str, str], list[Source]] = {}
    archived: dict[tuple[str, str], list[Source]] = {}
    masks: dict[str, list[Source]] = {}
    for path in list_files(raw):
        match = _IXI.match(path.name)
        if (dlmuse := _IXI_DLMUSE.match(path.name)) is not None:
            masks.setdefault(dlmuse.group(1), []).append(Source(str(path)))
        elif match:
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
    return group_subjects(chosen, False, masks=masks, mask_note=_DLMUSE_NOTE)


# --- BraTS 2021 -----------------------------------------------------------------------------------
_BRATS = re.compile(rf"^(?P<id>.+?)[_-](?P<role>t1|t1n|t2|t2w|seg|t1ce|t1c|flair|t2f){_NII}$")
_BRATS_ROLES = {"t1": "t1", "t1n": "t1", "t2": "t2", "t2w": "t2", "seg": "seg"}


def discover_brats21(raw: Path) -> list[Subject]:
    """BraTS case folders: `<case>/<case>_{t1,t2,seg}.nii.gz` (or BraTS 2023 `-t1n/-t2w/-seg`)."""
    found: dict[tuple[str, str], list[Source]] = {}
    segs: dict[str, list[Source]] = {}
    for path in list_files(raw):
        match = _BRATS.match(path.name)
        if not match or match.group("role") not in _BRATS_ROLES:
            continue
        role, sid = _BRATS_ROLES[match.group("role")], match.group("id")
        if role == "seg":
            segs.setdefault(sid, []).append(Source(str(path)))
        else:
            found.setdefault((sid, role), []).append(Source(str(path)))
    return group_subjects(found, already_stripped=True, segs=segs)


# --- BraTS 2015 (DeepMedic examples) -------------------------------------------------------------
_BRATS15_DIR = re.compile(r"^brats_.+")
_BRATS15_ROLES = {
    "t1c": re.compile(rf"^T1c(?:_subtrMeanDivStd)?{_NII}$", re.IGNORECASE),
    "flair": re.compile(rf"^Flair(?:_subtrMeanDivStd)?{_NII}$", re.IGNORECASE),
    "seg": re.compile(rf"^OTMultiClass{_NII}$", re.IGNORECASE),
    "mask": re.compile(rf"^brainmask{_NII}$", re.IGNORECASE),
}


def discover_brats15(raw: Path) -> list[Subject]:
    """DeepMedic's BraTS 2015 examples: case folders `brats_*/` with z-scored
    `T1c_subtrMeanDivStd`, `Flair_subtrMeanDivStd`, `brainmask` and `OTMultiClass` files."""
    found: dict[tuple[str, str], list[Source]] = {}
    segs: dict[str, list[Source]] = {}
    masks: dict[str, list[Source]] = {}
    for path in list_files(raw):
        if not _BRATS15_DIR.match(path.parent.name):
            continue
        sid = path.parent.name
        for role, pattern in _BRATS15_ROLES.items():
            if not pattern.match(path.name):
                continue
            if role in ("seg", "mask"):
                (segs if role == "seg" else masks).setdefault(sid, []).append(Source(str(path)))
            else:
                found.setdefault((sid, role), []).append(Source(str(path)))
    note = "the dataset's own brain mask, shipped with the scans"
    return group_subjects(found, True, segs, masks, note, mask_is_reference=True)


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
        for path in list_files(folder):
            for role, pattern in _MSLUB_ROLES.items():
                if pattern.match(path.name):
                    target = (
                        segs.setdefault(sid, [])
                        if role == "seg"
                        else found.setdefault((sid, role), [])
                    )
                    target.append(Source(str(path)))
    # open_ms_data's `_brain_` derivatives are skull-stripped; the raw release is not.
    return group_subjects(found, lambda s: "_brain" in Path(s.path).name.lower(), segs=segs)


# --- ATLAS v2 -------------------------------------------------------------------------------------
_ATLAS_T1 = re.compile(rf"^(?P<id>sub-[^_]+.*?)_T1w{_NII}$")


def discover_atlas_v2(raw: Path) -> list[Subject]:
    """ATLAS v2 BIDS T1w scans with their `label-L_desc-T1lesion_mask` siblings."""
    found: dict[tuple[str, str], list[Source]] = {}
    segs: dict[str, list[Source]] = {}
    for path in list_files(raw):
        match = _ATLAS_T1.match(path.name)
        if not match:
            continue
        sid = match.group("id")
        found.setdefault((sid, "t1"), []).append(Source(str(path)))
        for sibling in sorted(path.parent.glob(f"{sid}_*lesion_mask.nii*")):
            segs.setdefault(sid, []).append(Source(str(sibling)))
    return group_subjects(found, already_stripped=False, segs=segs)


# --- WMH ------------------------------------------------------------------------------------------
def discover_wmh(raw: Path) -> list[Subject]:
    """WMH challenge subjects `<Site>/<n>/pre/T1.nii.gz` + `<Site>/<n>/wmh.nii.gz`."""
    found: dict[tuple[str, str], list[Source]] = {}
    segs: dict[str, list[Source]] = {}
    for path in list_files(raw):
        if path.parent.name != "pre" or not re.match(rf"^T1{_NII}$", path.name):
            continue
        subject_dir = path.parent.parent
        sid = f"{subject_dir.parent.name}_{subject_dir.name}"
        found.setdefault((sid, "t1"), []).append(Source(str(path)))
        for candidate in (subject_dir / "wmh.nii.gz", subject_dir / "wmh.nii"):
            if candidate.is_file():
                segs.setdefault(sid, []).append(Source(str(candidate)))
    return group_subjects(found, already_stripped=False, segs=segs)


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
            "IXI<nnn>-<Site>-<nnnn>-T1.nii.gz / -T2.nii.gz (or _T1.nii.gz), "
            "or IXI-T1.tar / IXI-T2.tar",
            given_mask_help="{id}_T1_DLMUSE.nii.gz anywhere under the raw folder",
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
            "brats15",
            "Test/BraTS15",
            ("t1c", "flair"),
            ("t1c", "flair"),
            ("t1c", "flair"),
            True,
            False,
            discover_brats15,
            "brats_<case>/{T1c,Flair}_subtrMeanDivStd.nii.gz + brainmask.nii.gz + "
            "OTMultiClass.nii.gz",
            given_mask_help="{id}/brainmask.nii.gz",
            zscored=True,
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
_ALIASES = {
    "brats": "brats21",
    "brats2015": "brats15",
    "atlas": "atlas_v2",
    "atlasv2": "atlas_v2",
}


def get_spec(name: str) -> DatasetSpec:
    """The dataset spec for a CLI name (case-insensitive: ixi, brats21, brats15, mslub, ...)."""
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
