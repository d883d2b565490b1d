"""A small synthetic dataset in the reference layout, made from the MNI152 template in nilearn.

THIS IS SYNTHETIC DATA FOR SMOKE RUNS (`make demo`, the test suite). It exercises the real code path
(NIfTI reading, split CSVs, masks, lesion segmentations) with no download; results on it say nothing
about Patch2Loc on real MRI.

Source: the ICBM 2009a symmetric template (1 mm, RAS) that `nilearn` ships inside its package folder
(`nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`). The files are
read with nibabel straight from that folder (located with `importlib.util.find_spec`, nilearn is not
even imported), so nothing can touch the network.

How a subject is made:

- Template tissues: brain mask = T1 template > 0 (the template is skull-stripped: one component, no
  holes); T1 = the template; a T2-like contrast is synthesised from the tissue maps, with
  CSF = mask - GM - WM (clipped to [0, 1]) and T2 = 1.0 CSF + 0.5 GM + 0.33 WM (CSF bright, GM
  middle, WM dark). T1 and T2 are lightly smoothed once, before downsampling, against aliasing.
- Healthy subject: a random affine (rotation +-5 deg about each axis, scaling +-5 % per axis,
  translation +-3 mm, about the brain centre) and the resampling to `spacing_mm` isotropic are
  applied in one `scipy.ndimage.affine_transform`, linear for the images and linear for the binary
  mask, so the mask border is fractional like the reference's linearly warped masks (spec §2.1
  step 3) while its interior is exactly 1.0. Then per modality: a smooth multiplicative bias field
  (quadratic polynomial, at most +-10 %), a random global intensity scale (raw-scanner-like units,
  rounded to integers as the raw IXI files are integers, but stored as float32), additive Gaussian
  noise (clipped at 0: magnitude images are non-negative), skull stripping (image x (mask > 0)), and
  the reference's "cut" to the bounding box of mask != 0 with its `[min:max]` off-by-one
  (spec §2.1 step 4). At 2 mm a volume is about 73 x 89 x 77 voxels (69-76 x 86-95 x 73-81).
- Lesion subject: the same, plus 1-3 ellipsoidal lesions with smooth (logistic) edges, inserted into
  the clean tissue images before bias and noise: centred in white matter, fully inside the brain
  mask's interior, preferring positions that overlap white matter most and lie in the central axial
  slab (so the demo's central crop keeps them), 1-3 % of the brain volume in total; hypointense in
  T1, hyperintense in T2 (MS / tumour like). seg = binary lesion mask (uint8, logistic > 0.5).
- NIfTI affines: `diag(spacing)` plus the world position of the first voxel (RAS, as the template).
  Image, mask and seg of a subject share grid and affine. Every volume depends only on
  (seed, subject kind, subject number), not on how many subjects are asked for.

Layout written under `out_dir` (spec §1.1/§1.2, split CSV formats copied from the reference's
`splits/` folder; headers are hard-coded so that no reference files are needed):

    data/Train/ixi/{t1,t2,mask}/IXI9001-Demo-0001_{t1,t2,mask}.nii.gz   healthy: train/val/IXI test
    data/Test/Synth/{t1,t2,mask,seg}/synth001_{t1,t2,mask,seg}.nii.gz   lesion subjects
    splits/IXI_train_fold{0..4}.csv, IXI_val_fold{0..4}.csv, IXI_test.csv, avail_t2.csv,
           Synth_test.csv (n_test subjects), Synth_val.csv (n_val further lesion subjects)
    COMPLETE.json                                                          written last

CSV paths are relative to `out_dir/data` and start with "/" as in the reference.

CLI: `python -m data_prep.demo_data --out DIR [--seed N]` (also --n-train, --n-val, --n-test,
--n-ixi-test, --spacing-mm); it prints what it wrote, or that the folder was complete already.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import hashlib
import importlib.util
import io
import json
import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from p2l.atomic_write import write_bytes_atomic
from p2l.errors import ConfigError, DataError, P2LError

# Bump when the generated content changes, so that old COMPLETE.json markers stop matching.
FORMAT_VERSION = 1
MARKER_NAME = "COMPLETE.json"
N_FOLDS = 5
SYNTH_NAME = "Synth"

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Header rows of the reference split files (GitHub bakerhassan/Patch2Loc `splits/`, spec §1.1 and
# §1.2; the lesion sets use the WMH_test.csv columns). The leading empty name is pandas' index.
IXI_HEADER = (
    "",
    "img_name",
    "SEX_ID (1=m, 2=f)",
    "HEIGHT",
    "WEIGHT",
    "ETHNIC_ID",
    "MARITAL_ID",
    "OCCUPATION_ID",
    "QUALIFICATION_ID",
    "DATE_AVAILABLE",
    "STUDY_DATE",
    "age",
    "label",
    "img_path",
    "mask_path",
    "seg_path",
    "Agegroup",
)
AVAIL_T2_HEADER = ("", "0")
LESION_HEADER = ("", "img_name", "label", "age", "img_path", "mask_path", "seg_path")

# Synthetic contrasts (relative units; the global scale is random per subject).
T2_TISSUE = {"csf": 1.0, "gm": 0.5, "wm": 0.33}
# Lesion intensities the tissue is blended towards: T1 between CSF (~0.27) and GM (~0.65), T2 a bit
# below CSF (1.0) -- i.e. T1-hypo / T2-hyperintense like MS plaques or oedema.
LESION_T1_RANGE = (0.30, 0.45)
LESION_T2_RANGE = (0.75, 0.95)
LESION_EDGE_MM = 1.0  # logistic edge width
# A lesion's soft edge is drawn out to this many edge widths (alpha < 1e-3 beyond it).
LESION_REACH_EDGES = 8
LESION_FRACTION_RANGE = (0.01, 0.03)  # total lesion volume / brain volume
MAX_ROTATION_DEG = 5.0
MAX_SCALING = 0.05
MAX_TRANSLATION_MM = 3.0
MAX_BIAS = 0.10
NOISE_RANGE = (0.01, 0.03)  # noise sigma relative to the tissue-level intensity
INTENSITY_SCALE = 1000.0  # WM in T1 / CSF in T2 lands near this, like raw scanner integers
# Lesion centres stay in this central fraction of the brain's axial extent.
LESION_Z_FRACTION = 0.3
MAX_SUBJECTS = 999  # ids have three digits
# Independent random streams: np.random.default_rng([seed, stream, subject number]).
HEALTHY, LESION, DEMOGRAPHICS, FOLDS = 0, 1, 2, 3


@dataclass(frozen=True)
class _Template:
    """Template tissues on the 1 mm grid, cropped around the brain."""

    t1: np.ndarray  # float32, smoothed against aliasing, in [0, 1]
    t2: np.ndarray  # float32, smoothed, CSF = 1
    mask: np.ndarray  # float32 in {0, 1}
    wm: np.ndarray  # float32 probability
    affine: np.ndarray  # voxel -> world (mm)
    lo_mm: np.ndarray  # world bounding box of the brain
    hi_mm: np.ndarray


@dataclass(frozen=True)
class _Subject:
    t1: np.ndarray
    t2: np.ndarray
    mask: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray


def template_dir() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 2009a files."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn", "package not installed; it ships the MNI152 template we need")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _read_template_file(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = template_dir() / TEMPLATE_FILES[name]
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except FileNotFoundError:
        raise DataError(path, "MNI152 template file missing from the nilearn package") from None
    except Exception as err:  # nibabel raises many types for corrupt files
        raise DataError(path, f"cannot read the MNI152 template: {err}") from None
    if data.ndim != 3:
        raise DataError(path, f"expected a 3-D template, got shape {data.shape}")
    return data / 255.0, img.affine


@functools.lru_cache(maxsize=1)
def _load_template(spacing_mm: float) -> _Template:
    t1, affine = _read_template_file("t1")
    gm, _ = _read_template_file("gm")
    wm, _ = _read_template_file("wm")
    if gm.shape != t1.shape or wm.shape != t1.shape:
        raise DataError(template_dir(), "T1, GM and WM templates differ in shape")
    mask = (t1 > 0).astype(np.float32)
    if mask.sum() < 1000:
        raise DataError(template_dir() / TEMPLATE_FILES["t1"], "template brain is (almost) empty")
    # Crop to the brain plus a margin: smaller arrays make every warp cheaper.
    idx = np.argwhere(mask > 0)
    lo = np.maximum(idx.min(0) - 4, 0)
    hi = np.minimum(idx.max(0) + 5, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    t1, gm, wm, mask = t1[box], gm[box], wm[box], mask[box]
    affine = affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    t2 = (T2_TISSUE["csf"] * csf + T2_TISSUE["gm"] * gm + T2_TISSUE["wm"] * wm) * mask
    # Gaussian anti-aliasing before linear downsampling: sigma of half the zoom factor (in source
    # voxels) removes most of what a 1 mm -> spacing_mm resampling would fold back.
    sigma = 0.5 * max(spacing_mm - 1.0, 0.0)
    if sigma > 0:
        t1 = ndimage.gaussian_filter(t1, sigma)
        t2 = ndimage.gaussian_filter(t2, sigma)
    inside = np.argwhere(mask > 0)
    corners = np.stack([inside.min(0), inside.max(0)]).astype(np.float64)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return _Template(
        t1=t1.astype(np.float32),
        t2=t2.astype(np.float32),
        mask=mask,
        wm=wm.astype(np.float32),
        affine=affine,
        lo_mm=world.min(0),
        hi_mm=world.max(0),
    )


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_affine(rng: np.random.Generator, centre_mm: np.ndarray) -> np.ndarray:
    """World -> world map from template to subject: x' = R S (x - c) + c + t."""
    angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
    scales = rng.uniform(1.0 - MAX_SCALING, 1.0 + MAX_SCALING, 3)
    shift = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    linear = _rotation(angles) @ np.diag(scales)
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre_mm + shift - linear @ centre_mm
    return out


def _output_grid(tpl: _Template, warp: np.ndarray, spacing: float) -> tuple[np.ndarray, tuple]:
    """Axis-aligned grid at `spacing` covering the warped brain with a 2-voxel margin."""
    lo, hi = tpl.lo_mm, tpl.hi_mm
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    moved = corners @ warp[:3, :3].T + warp[:3, 3]
    origin = np.floor(moved.min(0) / spacing) * spacing - 2 * spacing
    shape = tuple(int(n) for n in np.ceil((moved.max(0) - origin) / spacing) + 3)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    return affine, shape


def _warp(vol: np.ndarray, matrix: np.ndarray, offset: np.ndarray, shape: tuple) -> np.ndarray:
    return ndimage.affine_transform(
        vol, matrix, offset, output_shape=shape, order=1, mode="constant", cval=0.0, prefilter=False
    )


def _bias_field(rng: np.random.Generator, shape: tuple, inside: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field 1 + b, |b| <= 10 % in the brain: random quadratic polynomial."""
    u, v, w = np.meshgrid(
        *[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape], indexing="ij"
    )
    basis = (u, v, w, u * u, v * v, w * w, u * v, u * w, v * w)
    coeffs = rng.standard_normal(len(basis)).astype(np.float32)
    field = sum(c * b for c, b in zip(coeffs, basis, strict=True))
    field -= field[inside].mean()
    field /= max(float(np.abs(field[inside]).max()), 1e-6)
    return 1.0 + rng.uniform(0.5 * MAX_BIAS, MAX_BIAS) * field


def _ellipsoid(
    shape: tuple, centre: np.ndarray, radii_mm: np.ndarray, axes: np.ndarray, spacing: float
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Soft ellipsoid in a local box: returns the box and 1 / (1 + exp((r - 1) R / edge))."""
    reach = radii_mm.max() + LESION_REACH_EDGES * LESION_EDGE_MM
    half = int(math.ceil(reach / spacing))
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    offset_mm = np.stack([(g - c) * spacing for g, c in zip(grids, centre, strict=True)], -1)
    local = offset_mm @ axes  # coordinates along the ellipsoid's own axes
    r = np.sqrt(((local / radii_mm) ** 2).sum(-1))
    mean_radius = float(radii_mm.mean())
    alpha = 1.0 / (1.0 + np.exp(np.clip((r - 1.0) * mean_radius / LESION_EDGE_MM, -50, 50)))
    return box, alpha.astype(np.float32)


def _lesion_alpha(
    rng: np.random.Generator, mask: np.ndarray, wm: np.ndarray, spacing: float
) -> np.ndarray:
    """Soft lesion map in [0, 1]: 1-3 ellipsoids in white matter, fully inside the brain."""
    alpha = np.zeros(mask.shape, np.float32)
    # Distance (mm) to the nearest voxel that is not full brain: centres farther than the lesion's
    # reach keep the whole soft lesion (alpha > 1e-3) inside mask == 1.
    depth = ndimage.distance_transform_edt(mask == 1.0, sampling=spacing)
    z = np.nonzero(mask.any(axis=(0, 1)))[0]
    z_mid, z_half = 0.5 * (z[0] + z[-1]), 0.5 * LESION_Z_FRACTION * (z[-1] - z[0])
    z_ok = np.abs(np.arange(mask.shape[2]) - z_mid) <= z_half
    brain_mm3 = float((mask > 0).sum()) * spacing**3
    n_lesions = int(rng.integers(1, 4))
    shares = rng.dirichlet(np.full(n_lesions, 2.0))
    total = rng.uniform(*LESION_FRACTION_RANGE) * brain_mm3
    for share in shares:
        ratios = np.array([1.0, *rng.uniform(0.6, 1.0, 2)])
        axes, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        volume = share * total
        for _attempt in range(12):
            radii = ratios * (volume / (4.0 / 3.0 * math.pi * ratios.prod())) ** (1.0 / 3.0)
            reach = radii.max() + LESION_REACH_EDGES * LESION_EDGE_MM + spacing
            ok = (depth >= reach) & (wm >= 0.5) & z_ok[None, None, :] & (alpha < 0.01)
            candidates = np.argwhere(ok)
            if len(candidates):
                break
            volume *= 0.7  # too big for any white-matter spot: shrink and retry
        else:
            continue
        picks = candidates[
            rng.choice(len(candidates), size=min(16, len(candidates)), replace=False)
        ]
        best = None
        for centre in picks:  # most white matter (not yet lesioned) inside the ellipsoid wins
            box, soft = _ellipsoid(mask.shape, centre, radii, axes, spacing)
            score = float((soft * wm[box] * (1.0 - alpha[box])).sum() / soft.sum())
            if best is None or score > best[0]:
                best = (score, box, soft)
        _, box, soft = best
        alpha[box] = np.maximum(alpha[box], soft)
    if not (alpha > 0.5).any():  # cannot happen at 1-4 mm (12 halvings of the volume); a bug if so
        raise RuntimeError("demo_data: found no room for a lesion")
    return alpha


def _make_subject(tpl: _Template, seed: int, kind: int, number: int, spacing: float) -> _Subject:
    """One synthetic subject (kind HEALTHY or LESION); depends only on its arguments."""
    rng = np.random.default_rng([seed, kind, number])
    centre = 0.5 * (tpl.lo_mm + tpl.hi_mm)
    warp = _random_affine(rng, centre)
    out_affine, shape = _output_grid(tpl, warp, spacing)
    # Output voxel -> template voxel, composed into one resampling (no double interpolation).
    to_tpl = np.linalg.inv(tpl.affine) @ np.linalg.inv(warp) @ out_affine
    matrix, offset = to_tpl[:3, :3], to_tpl[:3, 3]
    mask = _warp(tpl.mask, matrix, offset, shape)
    # Linear weights of an all-ones neighbourhood sum to 1 only up to rounding: make the interior
    # exactly 1.0 (the training rejection rule counts mask == 1, spec §3.2) and drop rounding dust.
    mask[mask > 1.0 - 1e-5] = 1.0
    mask[mask < 1e-6] = 0.0
    t1 = _warp(tpl.t1, matrix, offset, shape)
    t2 = _warp(tpl.t2, matrix, offset, shape)
    seg = None
    if kind == LESION:
        wm = _warp(tpl.wm, matrix, offset, shape)
        alpha = _lesion_alpha(rng, mask, wm, spacing)
        t1 = (1.0 - alpha) * t1 + alpha * rng.uniform(*LESION_T1_RANGE)
        t2 = (1.0 - alpha) * t2 + alpha * rng.uniform(*LESION_T2_RANGE)
        seg = (alpha > 0.5).astype(np.uint8)
    inside = mask > 0
    images = []
    for img in (t1, t2):
        img = img * _bias_field(rng, shape, inside)
        scale = INTENSITY_SCALE * rng.uniform(0.75, 1.25)
        noise = rng.uniform(*NOISE_RANGE) * scale
        img = img * scale + rng.normal(0.0, noise, shape)
        img = np.rint(np.clip(img, 0.0, None)) * inside  # skull stripping: image x (mask > 0)
        images.append(img.astype(np.float32))
    # The reference's cut.py: crop to the bounding box of mask != 0 with [min:max] (spec §2.1
    # step 4, including its off-by-one that drops the last non-zero index).
    idx = np.argwhere(mask != 0)
    lo, hi = idx.min(0), idx.max(0)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    affine = out_affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    return _Subject(
        t1=images[0][box],
        t2=images[1][box],
        mask=mask[box].astype(np.float32),
        seg=None if seg is None else seg[box],
        affine=affine,
    )


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 with a fixed gzip header (mtime 0), so equal arrays give equal bytes."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _csv_bytes(
    header: Sequence[str], rows: Sequence[Sequence[object]], newline: str = "\n"
) -> bytes:
    buf = io.StringIO()
    # pandas' to_csv style, as the reference files: quotes only where needed. The reference's IXI
    # files end lines with "\n", its lesion files (WMH_test.csv, ...) with "\r\n".
    writer = csv.writer(buf, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def ixi_id(number: int) -> str:
    """Id of healthy demo subject `number` (1-based), IXI-like: IXI9001-Demo-0001."""
    return f"IXI{9000 + number}-Demo-{number:04d}"


def synth_id(number: int) -> str:
    """Id of lesion demo subject `number` (1-based): synth001."""
    return f"synth{number:03d}"


def _ixi_row(seed: int, index: int) -> list[object]:
    """One row of an IXI split file; demographics are random but plausible (spec §1.1)."""
    rng = np.random.default_rng([seed, DEMOGRAPHICS, index])
    sid = ixi_id(index + 1)
    age = round(float(rng.uniform(20.0, 86.0)), 2)
    day = int(rng.integers(0, 550))
    date = np.datetime64("2005-06-01") + np.timedelta64(day, "D")
    return [
        index,
        f"{sid}_t1.nii.gz",
        int(rng.integers(1, 3)),  # SEX_ID
        int(rng.integers(150, 196)),  # HEIGHT
        int(rng.integers(50, 111)),  # WEIGHT
        int(rng.integers(1, 7)),  # ETHNIC_ID
        int(rng.integers(1, 6)),  # MARITAL_ID
        int(rng.integers(1, 9)),  # OCCUPATION_ID
        int(rng.integers(1, 6)),  # QUALIFICATION_ID
        1,  # DATE_AVAILABLE
        str(date),
        age,
        0,  # label: healthy
        f"/Train/ixi/t1/{sid}_t1.nii.gz",
        f"/Train/ixi/mask/{sid}_mask.nii.gz",
        "",  # seg_path: empty for IXI
        f"{float(min(int(age // 20), 4))}",  # Agegroup: 1 = [20, 40), ..., 4 = 80+
    ]


def _synth_row(index: int) -> list[object]:
    sid = synth_id(index + 1)
    d = f"/Test/{SYNTH_NAME}"
    return [
        index,
        f"{sid}_t1.nii.gz",
        1,
        "",  # age unknown, as in WMH_test.csv
        f"{d}/t1/{sid}_t1.nii.gz",
        f"{d}/mask/{sid}_mask.nii.gz",
        f"{d}/seg/{sid}_seg.nii.gz",
    ]


def _fold_indices(seed: int, n_pool: int, n_val: int, fold: int) -> tuple[list[int], list[int]]:
    """(train, val) subject indices of a fold: a window of a fixed shuffle of the non-test pool.

    Like the reference folds (spec §1.1) every fold has its own validation subset (disjoint across
    folds while the pool allows) and the train sets overlap heavily.
    """
    order = np.random.default_rng([seed, FOLDS]).permutation(n_pool)
    start = (fold * n_val) % n_pool
    val = {int(order[(start + j) % n_pool]) for j in range(n_val)}
    return sorted(set(range(n_pool)) - val), sorted(val)


def _split_files(
    seed: int, n_train: int, n_val: int, n_test: int, n_ixi_test: int
) -> dict[str, bytes]:
    n_pool = n_train + n_val
    rows = [_ixi_row(seed, i) for i in range(n_pool + n_ixi_test)]
    out = {}
    for fold in range(N_FOLDS):
        train, val = _fold_indices(seed, n_pool, n_val, fold)
        out[f"IXI_train_fold{fold}.csv"] = _csv_bytes(IXI_HEADER, [rows[i] for i in train])
        out[f"IXI_val_fold{fold}.csv"] = _csv_bytes(IXI_HEADER, [rows[i] for i in val])
    out["IXI_test.csv"] = _csv_bytes(IXI_HEADER, rows[n_pool:])
    t2_names = [[i, f"{ixi_id(i + 1)}_t2.nii.gz"] for i in range(len(rows))]
    out["avail_t2.csv"] = _csv_bytes(AVAIL_T2_HEADER, t2_names)
    test_rows = [_synth_row(i) for i in range(n_test)]
    out[f"{SYNTH_NAME}_test.csv"] = _csv_bytes(LESION_HEADER, test_rows, newline="\r\n")
    val_rows = [_synth_row(i) for i in range(n_test, n_test + n_val)]
    out[f"{SYNTH_NAME}_val.csv"] = _csv_bytes(LESION_HEADER, val_rows, newline="\r\n")
    return out


def _parameters(
    seed: int, n_train: int, n_val: int, n_test: int, n_ixi_test: int, spacing_mm: float
) -> dict:
    counts = {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test}
    counts["n_ixi_test"] = n_ixi_test
    for key, value in counts.items():
        low = 0 if key == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ConfigError(key, f"must be an integer >= {low}, got {value!r}")
    seed, n_train, n_val, n_test, n_ixi_test = (int(v) for v in counts.values())
    if n_train + n_val + n_ixi_test > MAX_SUBJECTS or n_test + n_val > MAX_SUBJECTS:
        raise ConfigError("n_train", f"at most {MAX_SUBJECTS} subjects of each kind (3-digit ids)")
    try:
        spacing = float(spacing_mm)
    except (TypeError, ValueError):
        raise ConfigError("spacing_mm", f"must be a number, got {spacing_mm!r}") from None
    # Below 1 mm would only upsample the 1 mm template; above 4 mm the brain is a few voxels wide.
    if not 1.0 <= spacing <= 4.0:
        raise ConfigError("spacing_mm", f"must be in [1, 4] mm, got {spacing_mm!r}")
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "n_ixi_test": n_ixi_test,
        "spacing_mm": spacing,
    }


def _read_marker(out_dir: Path) -> dict | None:
    try:
        marker = json.loads((out_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None  # absent or unreadable: the folder is not known to be complete
    return marker if isinstance(marker, dict) else None


def _marker_matches(out_dir: Path, marker: dict | None, params: dict) -> bool:
    if not marker or marker.get("parameters") != params:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, info in files.items():
        path = out_dir / rel
        if not isinstance(info, dict) or not path.is_file():
            return False
        if path.stat().st_size != info.get("bytes"):
            return False
    return True


def is_complete(
    out_dir: Path,
    *,
    seed: int = 0,
    n_train: int = 24,
    n_val: int = 4,
    n_test: int = 4,
    n_ixi_test: int = 4,
    spacing_mm: float = 2.0,
) -> bool:
    """Whether `out_dir` holds a finished demo dataset written with exactly these parameters."""
    params = _parameters(seed, n_train, n_val, n_test, n_ixi_test, spacing_mm)
    out_dir = Path(out_dir)
    return _marker_matches(out_dir, _read_marker(out_dir), params)


def write_demo_dataset(
    out_dir: Path,
    *,
    seed: int = 0,
    n_train: int = 24,
    n_val: int = 4,
    n_test: int = 4,
    n_ixi_test: int = 4,
    spacing_mm: float = 2.0,
) -> Path:
    """Write the synthetic demo dataset under `out_dir` (see the module docstring); return it.

    Healthy subjects: n_train + n_val (the fold pool) + n_ixi_test; lesion subjects: n_test
    (Synth_test.csv) + n_val (Synth_val.csv). Skips all work when `out_dir/COMPLETE.json` records
    the same parameters and its files are all present.
    """
    params = _parameters(seed, n_train, n_val, n_test, n_ixi_test, spacing_mm)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "exists and is not a folder")
    old = _read_marker(out_dir)
    if _marker_matches(out_dir, old, params):
        return out_dir
    # Drop the old marker first: if this run dies half way the folder must not look complete.
    try:
        (out_dir / MARKER_NAME).unlink(missing_ok=True)
    except OSError as err:
        raise DataError(out_dir / MARKER_NAME, f"cannot remove: {err.strerror or err}") from None

    spacing = params["spacing_mm"]
    tpl = _load_template(spacing)
    written: dict[str, dict] = {}

    def put(rel: str, data: bytes) -> None:
        write_bytes_atomic(out_dir / rel, data)
        written[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    n_healthy = n_train + n_val + n_ixi_test
    for i in range(n_healthy):
        sub = _make_subject(tpl, seed, HEALTHY, i + 1, spacing)
        sid = ixi_id(i + 1)
        for mod, arr in (("t1", sub.t1), ("t2", sub.t2), ("mask", sub.mask)):
            put(f"data/Train/ixi/{mod}/{sid}_{mod}.nii.gz", _nifti_bytes(arr, sub.affine))
    for i in range(n_test + n_val):
        sub = _make_subject(tpl, seed, LESION, i + 1, spacing)
        sid = synth_id(i + 1)
        for mod, arr in (("t1", sub.t1), ("t2", sub.t2), ("mask", sub.mask), ("seg", sub.seg)):
            rel = f"data/Test/{SYNTH_NAME}/{mod}/{sid}_{mod}.nii.gz"
            put(rel, _nifti_bytes(arr, sub.affine))
    for name, data in _split_files(seed, n_train, n_val, n_test, n_ixi_test).items():
        put(f"splits/{name}", data)

    # Files of an earlier run with other parameters that this run did not rewrite are stale.
    if old and isinstance(old.get("files"), dict):
        for rel in set(old["files"]) - set(written):
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                continue  # never delete outside out_dir, whatever a marker says
            (out_dir / rel).unlink(missing_ok=True)
    listing = json.dumps(sorted((k, v["sha256"]) for k, v in written.items())).encode()
    marker = {
        "generator": "data_prep.demo_data",
        "parameters": params,
        "digest": hashlib.sha256(listing).hexdigest(),
        "files": dict(sorted(written.items())),
    }
    write_bytes_atomic(out_dir / MARKER_NAME, (json.dumps(marker, indent=1) + "\n").encode())
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the demo dataset and say what was written (or that it was complete already)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.demo_data", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--n-train", type=int, default=24, help="healthy train subjects per fold")
    parser.add_argument("--n-val", type=int, default=4, help="val subjects (IXI folds and Synth)")
    parser.add_argument("--n-test", type=int, default=4, help="lesion test subjects")
    parser.add_argument("--n-ixi-test", type=int, default=4, help="healthy IXI test subjects")
    parser.add_argument("--spacing-mm", type=float, default=2.0, help="isotropic voxel size")
    args = parser.parse_args(argv)
    kwargs = {
        "seed": args.seed,
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "n_ixi_test": args.n_ixi_test,
        "spacing_mm": args.spacing_mm,
    }
    try:
        if is_complete(args.out, **kwargs):
            print(f"{args.out}: demo dataset complete already (seed {args.seed}), nothing to do")
            return 0
        out = write_demo_dataset(args.out, **kwargs)
    except P2LError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    marker = _read_marker(out) or {}
    files = marker.get("files", {})
    n_nii = sum(rel.endswith(".nii.gz") for rel in files)
    n_csv = sum(rel.endswith(".csv") for rel in files)
    size = sum(info["bytes"] for info in files.values()) / 2**20
    print(
        f"{out}: wrote demo dataset (seed {args.seed}): {n_nii} NIfTI volumes under {out / 'data'},"
    )
    print(
        f"  {n_csv} split files under {out / 'splits'}, {size:.1f} MiB,"
        f" digest {marker.get('digest')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
