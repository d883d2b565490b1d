"""Helpers for the data_prep tests on the real scans of ../shared/data (not a test module)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep import prepare
from p2l.preparation.atlas import load_atlas

SHARED = Path(__file__).resolve().parents[2] / "shared"
IXI = SHARED / "data/ixi_defacing_pipeline/data/example_input_hdbet_processed"
IXI_ID = "IXI002-Guys-0828"
# Only the two coarsest registration levels and one short N4 level: the checks do not need more
# (IXI002 T1 Dice with the atlas brain 0.958 this way, 0.963 with the reference's schedule).
FAST = ["--registration-iterations", "100,50", "--n4-iterations", "20", "--no-progress"]

FAKE_HD_BET = """#!{python}
# Stand-in for HD-BET v1's CLI: `hd-bet -i IN -o OUT` writes OUT and OUT_mask.nii.gz.
import os, sys
import ants
args = sys.argv[1:]
inp, out = args[args.index("-i") + 1], args[args.index("-o") + 1]
image = ants.image_read(inp)
mask = ants.resample_image_to_target(ants.image_read(os.environ["FAKE_HDBET_MASK"]), image,
                                     interp_type="linear")
mask = ants.threshold_image(mask, 0.5, 2.0)
ants.image_write(image * mask, out)
ants.image_write(mask, out.replace(".nii.gz", "_mask.nii.gz"))
"""


def require_shared(path: Path) -> None:
    """Skip cleanly in a user's clone without ../shared."""
    if not path.is_dir():
        pytest.skip("../shared is absent (a user's clone): real-data test skipped")


def prepare_ixi002(root: Path, modality: str) -> tuple[Path, int, dict]:
    """IXI002 `modality` ("T1"/"T2") from its provider-style file through the `hd-bet` path.

    HD-BET is not installed here: a stand-in `hd-bet` returns the mask HD-BET's authors published
    for this scan, resampled to the 1 mm input. Returns (output root, exit status, manifest row).
    """
    require_shared(IXI)
    raw = root / "raw"
    raw.mkdir(parents=True)
    name = f"{IXI_ID}-{modality}"
    (raw / f"{name}.nii.gz").symlink_to(IXI / name / f"hd_bet_{name}.nii.gz")
    tool = root / "bin" / "hd-bet"
    tool.parent.mkdir()
    tool.write_text(FAKE_HD_BET.format(python=sys.executable))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("FAKE_HDBET_MASK", str(IXI / name / f"hd_bet_mask_{name}.nii.gz"))
        argv = ["--dataset", "ixi", "--raw", str(raw), "--out", str(out), "--skull-strip", "auto"]
        status = prepare.main(argv + FAST)
    (line,) = (out / "Train/ixi/manifest.jsonl").read_text().splitlines()
    return out, status, json.loads(line)


def dice_with_atlas_brain(folder: Path, row: dict) -> float:
    """Dice of a prepared brain mask (>= 0.5) with the atlas brain mask, on the atlas grid."""
    mask = np.asarray(nib.load(folder / row["outputs"]["mask"]["path"]).dataobj) >= 0.5
    atlas = load_atlas().brain_mask.numpy() > 0
    lower = next(s for s in row["steps"] if s["name"] == "crop")["result"]["lower"]
    full = np.zeros_like(atlas)
    full[tuple(slice(lo, lo + n) for lo, n in zip(lower, mask.shape, strict=True))] = mask
    return float(2 * np.sum(full & atlas) / (full.sum() + atlas.sum()))
