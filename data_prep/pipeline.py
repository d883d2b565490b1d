"""One scan from raw file to the reference layout: the five steps of spec §2.1, in memory.

`prepare_scan` reads the raw scan (and its lesion mask), runs reorient/resample -> skull stripping
-> affine registration to the atlas -> crop to the brain -> N4, writes image, mask and seg
atomically, and returns the manifest row. `data_prep.prepare` runs it over subjects.

Working grid: `PrepConfig.spacing` (1 mm = the reference; 2 mm for data that only exists at 2 mm).
The scan is resampled to it, and the atlas must have been made on it (`load_atlas(..., spacing)`).
Z-scored sources (`DatasetSpec.zscored`) get their brain shifted positive after skull stripping,
so registration sees a zero background and N4 positive intensities (a deviation, spec §2.1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import ants
import numpy as np

from data_prep.adapters import DatasetSpec, Source, Subject, output_paths
from data_prep.manifest import (
    FORMAT_VERSION,
    config_key,
    file_record,
    intensity_stats,
    mask_stats,
)
from p2l.errors import ConfigError, DataError
from p2l.preparation.ants_io import read_ants, sha256_file, write_ants_atomic
from p2l.preparation.atlas import Atlas, is_unit_spacing
from p2l.preparation.skull_strip import ATLAS_FALLBACK_VERSION, default_method, skull_strip
from p2l.preparation.steps import (
    N4Params,
    RegistrationParams,
    affine_summary,
    binarise_labels,
    binarise_warped_seg,
    crop_to_mask,
    n4_correct,
    register_to_atlas,
    remove_transform_files,
    reorient_resample,
    shift_to_positive,
    warp_to_atlas,
)

# Bump when the processing changes for the same configuration, so restarts redo old outputs.
PIPELINE_VERSION = "1"
_GRID_ATOL_MM = 1e-2


@dataclass(frozen=True)
class PrepConfig:
    """Everything that decides the outputs, apart from the raw files and the atlas content."""

    atlas_path: str | None = None
    skull_strip: str = "auto"  # auto | hd-bet | none | atlas | given-mask
    hd_bet_args: str = ""
    registration: RegistrationParams = field(default_factory=RegistrationParams)
    n4: N4Params = field(default_factory=N4Params)
    crop_mode: str = "reference"
    exclude_labels: tuple[int, ...] = ()
    seg_threshold: float = 0.0  # 0: reference `> 0` after the linear warp; 0.5: volume-preserving
    spacing: float = 1.0  # working grid in mm (spec §2.1: 1 mm)

    def as_dict(self) -> dict:
        """Plain-JSON form for the manifest and the restart key. `spacing` appears only when it is
        not the reference 1 mm, so 1 mm restart keys are those of earlier runs."""
        extra = {} if is_unit_spacing(self.spacing) else {"spacing": float(self.spacing)}
        return {
            "atlas_path": self.atlas_path,
            "skull_strip": self.skull_strip,
            "hd_bet_args": self.hd_bet_args,
            "registration": self.registration.as_dict(),
            "n4": self.n4.as_dict(),
            "crop_mode": self.crop_mode,
            "exclude_labels": list(self.exclude_labels),
            "seg_threshold": self.seg_threshold,
            **extra,
        }


def skull_strip_method(config: PrepConfig, subject: Subject) -> str:
    """The method used for this subject (`auto`: none if stripped, else hd-bet, else atlas)."""
    if config.skull_strip == "auto":
        return default_method(subject.already_stripped, subject.mask_is_reference)
    return config.skull_strip


def scan_key(config: PrepConfig, atlas: Atlas, subject: Subject, modality: str, method: str) -> str:
    """Restart key of one scan: configuration, atlas content and raw file identities."""
    seg = subject.seg.identity() if subject.seg is not None else None
    payload = {
        "pipeline": PIPELINE_VERSION,
        "config": config.as_dict(),
        "method": method,
        "atlas_sha256": atlas.sha256,
        "modality": modality,
        "image": subject.images[modality].identity(),
        "seg": seg,
    }
    if method == "given-mask":  # only then: other methods keep their earlier keys
        mask = subject.brain_mask
        payload["given_mask"] = mask.identity() if mask is not None else None
    if method == "atlas":  # the fallback changed (several starts): its scans are redone
        payload["atlas_fallback"] = ATLAS_FALLBACK_VERSION
    return config_key(payload)


def _read_source(source: Source, kind: str) -> tuple[ants.ANTsImage, str]:
    with source.local_file() as path:
        return read_ants(path, kind=kind), sha256_file(path)  # type: ignore[arg-type]


def read_given_mask(
    subject: Subject, spec: DatasetSpec, image: ants.ANTsImage, source: Source
) -> tuple[ants.ANTsImage, str, str]:
    """The subject's own brain mask (label > 0) on the scan's native grid, its manifest note and
    its sha256."""
    if subject.brain_mask is None:
        expected = spec.given_mask_help.format(id=subject.subject_id)
        hint = f"expected {expected}" if expected else f"the {spec.key} layout has no mask files"
        raise DataError(
            source.describe(),
            f"--skull-strip given-mask: no brain mask file for {subject.subject_id}; {hint}",
        )
    mask, sha = _read_source(subject.brain_mask, "image")  # labels or 0/1 floats: > 0 is brain
    where = subject.brain_mask.describe()
    _check_same_grid(image, mask, source.describe(), where, "given brain mask")
    binary = mask.new_image_like((mask.numpy() > 0).astype(np.float32))
    note = f"provided mask: {where}" + (
        f" ({subject.brain_mask_note})" if subject.brain_mask_note else ""
    )
    return binary, note, sha


def _check_same_grid(
    image: ants.ANTsImage,
    other: ants.ANTsImage,
    image_src: str,
    src: str,
    what: str = "lesion mask",
) -> None:
    problems = []
    if tuple(image.shape) != tuple(other.shape):
        problems.append(f"shape {tuple(other.shape)} vs {tuple(image.shape)}")
    if not np.allclose(image.spacing, other.spacing, rtol=1e-4, atol=1e-4):
        problems.append(f"spacing {tuple(other.spacing)} vs {tuple(image.spacing)}")
    if not np.allclose(image.origin, other.origin, atol=_GRID_ATOL_MM):
        problems.append(f"origin {tuple(other.origin)} vs {tuple(image.origin)}")
    if not np.allclose(image.direction, other.direction, atol=1e-4):
        problems.append("direction cosines differ")
    if problems:
        raise DataError(
            src,
            f"{what} is not on the grid of its scan {image_src}: " + "; ".join(problems),
        )


class _Clock:
    """Wall time per step, for the manifest (the note's per-step timings come from here)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._start = time.perf_counter()

    def record(self, name: str, start: float, params: dict | None = None, result=None) -> None:
        entry = {"name": name, "seconds": round(time.perf_counter() - start, 3)}
        if params:
            entry["params"] = params
        if result:
            entry["result"] = result
        self.steps.append(entry)

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 3)


def prepare_scan(
    subject: Subject,
    modality: str,
    spec: DatasetSpec,
    config: PrepConfig,
    atlas: Atlas,
    root: Path,
    versions: dict,
) -> dict:
    """Run spec §2.1 on one scan, write its outputs, return its manifest row.

    Raises DataError (naming the raw file) for unreadable or inconsistent inputs and for
    implausible intermediate results (empty or implausible brain mask, lesion lost).
    """
    source = subject.images[modality]
    method = skull_strip_method(config, subject)
    clock = _Clock()

    start = time.perf_counter()
    image, image_sha = _read_source(source, "image")
    seg_bin, label_info, seg_sha = None, None, None
    if spec.has_seg:
        if subject.seg is None:
            raise DataError(source.describe(), "no lesion segmentation found for this scan")
        seg_native, seg_sha = _read_source(subject.seg, "seg")
        _check_same_grid(image, seg_native, source.describe(), subject.seg.describe())
        seg_bin, label_info = binarise_labels(seg_native, config.exclude_labels)
        label_info["source_mm3"] = round(
            label_info["lesion_voxels"] * float(np.prod(seg_native.spacing)), 2
        )
    given, given_note, given_sha = (
        read_given_mask(subject, spec, image, source)
        if method == "given-mask"
        else (None, "", None)
    )
    clock.record("read", start)
    if not np.isclose(atlas.spacing_mm, config.spacing):
        raise ConfigError(
            "spacing", f"the atlas grid is {atlas.spacing_mm} mm, the run's {config.spacing} mm"
        )

    start = time.perf_counter()
    resampled, info = reorient_resample(image, "image", config.spacing)
    params = {"spacing_mm": float(config.spacing), "orientation": "RAI"}
    if given is not None:
        given, _ = reorient_resample(given, "mask", config.spacing)
        params["given_mask"] = "label > 0, resampled linearly then >= 0.5 (if not on the grid)"
    clock.record("reorient_resample", start, params, info)

    start = time.perf_counter()
    stripped, brain, strip_info = skull_strip(
        resampled,
        method,
        atlas,
        source=source.describe(),
        registration=config.registration,
        hd_bet_args=config.hd_bet_args,
        given_mask=given,
        given_note=given_note,
    )
    clock.record("skull_strip", start, {"method": method}, strip_info)
    if spec.zscored:
        start = time.perf_counter()
        stripped, shift = shift_to_positive(stripped, brain)
        note = "z-scored source: brain min -> 1% of its range, background 0 (N4 needs > 0)"
        clock.record("shift_positive", start, {"why": note}, shift)

    start = time.perf_counter()
    warped, transforms = register_to_atlas(stripped, atlas, config.registration)
    try:
        affine = affine_summary(transforms)
        mask_atlas = warp_to_atlas(brain, atlas, transforms)
        seg_fraction = None if seg_bin is None else warp_to_atlas(seg_bin, atlas, transforms)
    finally:
        remove_transform_files(transforms)
    clock.record(
        "register",
        start,
        {
            **config.registration.as_dict(),
            "mask_interpolation": "linear (fractional kept)",
            "seg_interpolation": "linear, then > 0"
            if config.seg_threshold <= 0
            else f"linear, then >= {config.seg_threshold}",
        },
        {"affine": affine},
    )
    if not np.any(mask_atlas.numpy() > 0):
        raise DataError(source.describe(), "the brain mask left the atlas grid after registration")

    start = time.perf_counter()
    volumes = {"image": warped, "mask": mask_atlas}
    if seg_fraction is not None:
        volumes["seg"] = binarise_warped_seg(seg_fraction, config.seg_threshold)
        volumes["seg_fraction"] = seg_fraction
    cropped, crop_info = crop_to_mask(volumes, mask_atlas, config.crop_mode)
    clock.record("crop", start, {"mode": config.crop_mode}, crop_info)

    start = time.perf_counter()
    corrected = n4_correct(cropped["image"], cropped["mask"], config.n4)
    clock.record("n4", start, config.n4.as_dict())

    if not np.all(np.isfinite(corrected.numpy())):
        raise DataError(source.describe(), "bias-field correction produced non-finite values")
    if label_info is not None and label_info["lesion_voxels"] > 0 and not cropped["seg"].sum():
        raise DataError(
            subject.seg.describe(),  # type: ignore[union-attr]
            "lesion lost: it lies outside the brain region kept after registration and crop",
        )

    start = time.perf_counter()
    paths = output_paths(root, spec, subject.subject_id, modality)
    write_ants_atomic(cropped["mask"], paths["mask"], "mask")
    if "seg" in paths:
        write_ants_atomic(cropped["seg"], paths["seg"], "seg")
    write_ants_atomic(corrected, paths["image"], "image")
    clock.record("write", start)

    folder = root / spec.folder
    image_np, mask_np = corrected.numpy(), cropped["mask"].numpy()
    row = {
        "format": FORMAT_VERSION,
        "pipeline": PIPELINE_VERSION,
        "dataset": spec.key,
        "subject": subject.subject_id,
        "modality": modality,
        "config_key": scan_key(config, atlas, subject, modality, method),
        "config": config.as_dict(),
        "spacing_mm": float(config.spacing),
        "source": {
            "image": source.describe(),
            "image_sha256": image_sha,
            "image_shape": [int(n) for n in image.shape],
            "image_spacing": [round(float(s), 6) for s in image.spacing],
            "seg": None if subject.seg is None or not spec.has_seg else subject.seg.describe(),
            "seg_sha256": seg_sha,
            **(
                {"brain_mask": subject.brain_mask.describe(), "brain_mask_sha256": given_sha}
                if given_sha is not None and subject.brain_mask is not None
                else {}
            ),
        },
        "skull_strip": {k: strip_info[k] for k in ("method", "quality", "brain_ml")},
        "atlas": atlas.describe(),
        "steps": clock.steps,
        "versions": versions,
        "outputs": {kind: file_record(path, folder) for kind, path in paths.items()},
        "brain_mask": mask_stats(mask_np),
        "intensity": intensity_stats(image_np, mask_np),
        "seconds_total": clock.total(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if label_info is not None:
        seg_np = cropped["seg"].numpy()
        row["lesion"] = {
            **label_info,
            "voxels_gt0": int(np.count_nonzero(seg_np > 0)),
            # Sum of the linearly warped fractions: the volume-preserving lesion size (voxels).
            "fraction_sum": round(float(cropped["seg_fraction"].numpy().sum()), 2),
        }
    return row
