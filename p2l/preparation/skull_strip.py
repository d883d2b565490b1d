"""Skull stripping, spec §2.1 step 2, as a pluggable step with four methods.

- "hd-bet": the reference's tool, run as the user's installed `hd-bet` command (never installed or
  downloaded here). Works with HD-BET v1 (writes `<out>_mask.nii.gz`) and v2 (`--save_bet_mask`,
  writes `<out>_bet.nii.gz`).
- "none": the scan is already skull-stripped (BraTS, the MSLUB derivatives); the brain mask is
  `ants.get_mask` with defaults, as the reference's `get_mask.py` for BraTS.
- "atlas": offline fallback needing no model: register the brain-extracted atlas to the head, refine
  with an intensity/morphology brain estimate, register again and warp the atlas brain mask back.
  LOWER QUALITY than HD-BET (an affine atlas shape, not the subject's brain outline); logged and
  recorded as such in the manifest. Checked on real heads only visually (WMH scans) and for a
  plausible brain volume.
- "given-mask": the subject's own brain mask shipped with the data (label > 0: BraTS 2015
  `brainmask.nii.gz`, a DLMUSE parcellation for the 2 mm IXI Hammersmith set), carried to the
  working grid with the image by the caller (linear, then >= 0.5). Recorded with its file; a model's
  parcellation is a pseudo-label, not a reference mask, and the manifest says so.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import ants
import numpy as np
from ants import config as ants_config
from scipy import ndimage

from p2l.errors import ConfigError, DataError
from p2l.preparation.atlas import Atlas
from p2l.preparation.steps import (
    RegistrationParams,
    brain_mask_from_stripped,
    remove_transform_files,
)

METHODS: tuple[str, ...] = ("hd-bet", "none", "atlas", "given-mask")
QUALITY = {
    "hd-bet": "reference method (HD-BET, as the paper)",
    "none": "input already skull-stripped; mask = ants.get_mask (reference for BraTS)",
    "atlas": "LOWER QUALITY offline fallback: atlas-registration mask, not HD-BET",
    "given-mask": "brain mask shipped with the data (label > 0), not HD-BET",
}
# A brain outside this range (mL) means the mask is wrong, whatever produced it.
PLAUSIBLE_BRAIN_ML = (400.0, 2500.0)
_DILATE_PRIOR_MM = 8  # metric region around the atlas brain for the first, head-to-brain affine
_ERODE_MM = 4  # erosion that cuts thin links between brain and scalp before keeping one component
_NEAR_PRIOR_MM = 3  # margin around the registered prior in which tissue is looked for
_CLOSE_MM = 3  # closing of the brain estimate
# Starts of the first registration: the centre-of-mass alignment moved superior by these (mm).
_START_OFFSETS_MM = (0.0, 15.0, 30.0)
# In data_prep's restart key of atlas-stripped scans: bumped when the fallback changes (2: the
# several starts above).
ATLAS_FALLBACK_VERSION = "2"


def _voxels(mm: float, spacing: float) -> int:
    """A radius in mm as whole voxels of the working grid (the same numbers as before at 1 mm)."""
    return max(1, int(round(mm / spacing)))


def hd_bet_command() -> str | None:
    """Path of the user's `hd-bet` executable, or None when it is not installed."""
    return shutil.which("hd-bet")


def hd_bet_version() -> str:
    """Installed HD-BET version for the manifest ('not installed' / 'unknown' otherwise)."""
    if hd_bet_command() is None:
        return "not installed"
    from importlib import metadata

    for name in ("HD-BET", "hd-bet", "HD_BET"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def skull_strip(
    image: ants.ANTsImage,
    method: str,
    atlas: Atlas,
    *,
    source: str,
    registration: RegistrationParams,
    hd_bet_args: str = "",
    given_mask: ants.ANTsImage | None = None,
    given_note: str = "",
) -> tuple[ants.ANTsImage, ants.ANTsImage, dict]:
    """Return (skull-stripped image, binary brain mask, info) for an RAI scan on the working grid.

    `source` names the input file in errors; `given_mask` (method "given-mask") is the subject's
    mask already on the scan's grid, `given_note` says where it came from (for the manifest).
    Raises DataError when the tool fails or the mask is empty or of implausible volume.
    """
    if method not in METHODS:
        raise ConfigError("skull_strip", f"expected one of {METHODS}, got {method!r}")
    quality = QUALITY[method]
    if method == "given-mask":
        if given_mask is None:
            raise DataError(source, "skull stripping given-mask: no brain mask given for this scan")
        if tuple(given_mask.shape) != tuple(image.shape):
            raise DataError(
                source, f"given brain mask shape {given_mask.shape} differs from {image.shape}"
            )
        mask = image.new_image_like((given_mask.numpy() > 0).astype(np.float32))
        stripped, info = image * mask, {}
        quality = given_note or quality
    elif method == "hd-bet":
        stripped, mask, info = _run_hd_bet(image, source, hd_bet_args)
    elif method == "none":
        mask = brain_mask_from_stripped(image)
        stripped, info = image, {}
    else:
        try:
            mask, info = atlas_brain_mask(image, atlas, registration)
        except ValueError as err:  # no tissue: nothing brain-like where the atlas put the brain
            raise DataError(source, f"skull stripping ({method}) found no brain: {err}") from None
        stripped = image * mask
    volume_ml = float(mask.numpy().sum()) * float(np.prod(mask.spacing)) / 1000.0
    lo, hi = PLAUSIBLE_BRAIN_ML
    if not lo <= volume_ml <= hi:
        raise DataError(
            source,
            f"skull stripping ({method}) gave a brain of {volume_ml:.0f} mL, outside the plausible "
            f"{lo:.0f}-{hi:.0f} mL; check the scan"
            + (" or install HD-BET" if method == "atlas" else ""),
        )
    info.update(method=method, quality=quality, brain_ml=round(volume_ml, 1))
    return stripped, mask, info


def _run_hd_bet(
    image: ants.ANTsImage, source: str, extra_args: str
) -> tuple[ants.ANTsImage, ants.ANTsImage, dict]:
    command = hd_bet_command()
    if command is None:
        raise ConfigError(
            "skull_strip",
            "'hd-bet' was requested but no hd-bet command is on PATH; install HD-BET yourself, or "
            "use --skull-strip atlas (lower-quality offline fallback) or none (already stripped)",
        )
    with tempfile.TemporaryDirectory(prefix="p2l_hdbet_") as tmp:
        inp, out = Path(tmp) / "scan.nii.gz", Path(tmp) / "scan_brain.nii.gz"
        ants.image_write(image, str(inp))
        args = [command, "-i", str(inp), "-o", str(out), *shlex.split(extra_args)]
        if _supports_flag(command, "--save_bet_mask") and "--save_bet_mask" not in args:
            args.append("--save_bet_mask")  # HD-BET v2 writes the mask only when asked
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise DataError(source, f"hd-bet failed (exit {done.returncode}): " + " | ".join(tail))
        candidates = [Path(tmp) / "scan_brain_mask.nii.gz", Path(tmp) / "scan_brain_bet.nii.gz"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise DataError(
                source, f"hd-bet wrote no mask (looked for {[p.name for p in candidates]})"
            )
        mask = ants.image_read(str(found[0]))
    if tuple(mask.shape) != tuple(image.shape):
        raise DataError(source, f"hd-bet mask shape {mask.shape} differs from scan {image.shape}")
    mask = image.new_image_like((mask.numpy() > 0.5).astype(np.float32))
    # Record the call without the temporary file names.
    info = {"command": shlex.join(["hd-bet", "-i", "IN", "-o", "OUT", *args[5:]])}
    return image * mask, mask, info


@functools.lru_cache(maxsize=4)
def _supports_flag(command: str, flag: str) -> bool:
    try:
        done = subprocess.run(
            [command, "--help"], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in (done.stdout + done.stderr)


def atlas_brain_mask(
    image: ants.ANTsImage, atlas: Atlas, params: RegistrationParams
) -> tuple[ants.ANTsImage, dict]:
    """Offline fallback brain mask of a (head) scan from the atlas; binary, on the scan's grid.

    1. affine atlas <- head (metric restricted to the dilated atlas brain): a rough, large prior;
    2. brain estimate: 3-class Otsu lower threshold inside the prior, erode, largest component,
       dilate, fill holes, close (removes skull and scalp the prior still covers);
    3. affine again on the head masked by that estimate, starting from step 1;
    4. the atlas brain mask warped back (linear, >= 0.5).
    Only the coarse levels (shrink >= 4) of `params` run: the result is a shape prior anyway.
    Morphology radii are in mm, converted to voxels of the scan's (working) grid.
    """
    spacing = float(np.mean(image.spacing))
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    coarse = tuple(
        it if shrink >= 4 else 0
        for it, shrink in zip(params.aff_iterations, params.aff_shrink_factors, strict=True)
    )
    ants_config.set_ants_deterministic(on=False, seed_value=int(params.random_seed))
    common = dict(
        type_of_transform="Affine",
        aff_iterations=coarse,
        aff_shrink_factors=tuple(params.aff_shrink_factors),
        aff_smoothing_sigmas=tuple(params.aff_smoothing_sigmas),
    )
    region = ants.iMath(atlas.brain_mask, "MD", _voxels(_DILATE_PRIOR_MM, atlas.spacing_mm))
    first, start_mm = _best_start(atlas, image, region, common)
    prior = _warp_back(atlas, image, first["fwdtransforms"])

    data = image.numpy()
    erode = _ball(_voxels(_ERODE_MM, spacing))
    near_prior = ndimage.binary_dilation(prior, _ball(_voxels(_NEAR_PRIOR_MM, spacing)))
    threshold = _otsu3_lower(data[near_prior])
    tissue = (data > threshold) & near_prior
    tissue = ndimage.binary_erosion(tissue, erode)
    tissue = _largest_component(tissue)
    tissue = ndimage.binary_dilation(tissue, erode)
    tissue = ndimage.binary_closing(
        ndimage.binary_fill_holes(tissue), _ball(_voxels(_CLOSE_MM, spacing))
    )
    if not tissue.any():
        raise ValueError("atlas fallback found no brain tissue")
    estimate = image.new_image_like(tissue.astype(np.float32))

    second = ants.registration(
        fixed=atlas.image,
        moving=image * estimate,
        initial_transform=first["fwdtransforms"][0],
        **common,
    )
    brain = _warp_back(atlas, image, second["fwdtransforms"])
    remove_transform_files(first, second)
    info = {
        "fallback": {
            "iterations": list(coarse),
            "start_offset_mm": start_mm,
            "tissue_threshold": round(float(threshold), 4),
            "prior_ml": round(float(prior.sum()) * voxel_ml, 1),
            "tissue_ml": round(float(tissue.sum()) * voxel_ml, 1),
        }
    }
    return image.new_image_like(brain.astype(np.float32)), info


def _best_start(atlas: Atlas, image: ants.ANTsImage, region: ants.ANTsImage, common: dict):
    """The first (head -> atlas) registration from the centre-of-mass start and from starts moved
    superior by `_START_OFFSETS_MM`; the one whose final mutual information in the dilated atlas
    brain is best. A head's centre of mass lies below the brain's by how much neck the field of
    view holds, and one start alone ended in a wrong optimum on real WMH heads (brain masks of
    1137 to 2299 ml for one head)."""
    fixed_com = np.asarray(ants.get_center_of_mass(atlas.image), dtype=float)
    moving_com = np.asarray(ants.get_center_of_mass(image), dtype=float)
    best, best_mi, best_offset = None, np.inf, 0.0
    for offset in _START_OFFSETS_MM:
        start = ants.create_ants_transform(
            transform_type="AffineTransform",
            dimension=3,
            center=tuple(fixed_com),
            translation=tuple(moving_com - fixed_com + np.array([0.0, 0.0, offset])),
        )
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "start.mat")
            ants.write_transform(start, path)
            result = ants.registration(
                fixed=atlas.image, moving=image, mask=region, initial_transform=path, **common
            )
        mi = float(ants.image_similarity(atlas.image, result["warpedmovout"],
                                         metric_type="MattesMutualInformation",
                                         fixed_mask=region, moving_mask=region))  # fmt: skip
        if mi < best_mi:  # ANTs' sign: lower is more similar
            if best is not None:
                remove_transform_files(best)
            best, best_mi, best_offset = result, mi, offset
        else:
            remove_transform_files(result)
    return best, best_offset


def _warp_back(atlas: Atlas, image: ants.ANTsImage, transforms: list[str]) -> np.ndarray:
    warped = ants.apply_transforms(
        fixed=image,
        moving=atlas.brain_mask,
        transformlist=transforms,
        whichtoinvert=[True] * len(transforms),
        interpolator="linear",
    )
    return warped.numpy() >= 0.5


def _ball(radius: int) -> np.ndarray:
    z, y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1, -radius : radius + 1]
    return x * x + y * y + z * z <= radius * radius


def _largest_component(binary: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(binary)
    if count <= 1:
        return binary
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _otsu3_lower(values: np.ndarray, bins: int = 128) -> float:
    """Lower of the two thresholds maximising between-class variance for 3 classes.

    In a T1 head the classes are roughly (air, bone, CSF), grey matter, (white matter, fat); the
    lower threshold keeps brain tissue and drops bone and air.
    """
    lo, hi = np.percentile(values, [0.5, 99.5])
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    p = hist / max(hist.sum(), 1)
    cum_p, cum_m = np.cumsum(p), np.cumsum(p * centres)
    total = cum_m[-1]
    i, j = np.meshgrid(np.arange(1, bins), np.arange(1, bins), indexing="ij")
    valid = j > i
    w0, w1 = cum_p[i - 1], cum_p[j - 1] - cum_p[i - 1]
    w2 = 1.0 - cum_p[j - 1]
    m0 = cum_m[i - 1]
    m1 = cum_m[j - 1] - cum_m[i - 1]
    m2 = total - cum_m[j - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = m0**2 / w0 + m1**2 / w1 + m2**2 / w2
    between = np.where(valid & (w0 > 0) & (w1 > 0) & (w2 > 0), between, -np.inf)
    best_i, _ = np.unravel_index(int(np.argmax(between)), between.shape)
    return float(edges[int(i[best_i, 0])])


def describe_hd_bet_env() -> dict:
    """HD-BET availability for logs and the manifest."""
    command = hd_bet_command()
    return {"hd_bet": command or "not installed", "hd_bet_version": hd_bet_version()}


def default_method(already_stripped: bool, mask_is_reference: bool = False) -> str:
    """The method `auto` picks: given-mask where the dataset's own brain mask is its reference
    (BraTS 2015 deepmedic), none for stripped data, else hd-bet if installed, else atlas."""
    if mask_is_reference:
        return "given-mask"
    if already_stripped:
        return "none"
    # The caller logs the choice once per run (QUALITY says the fallback is lower quality).
    return "hd-bet" if hd_bet_command() is not None else "atlas"
