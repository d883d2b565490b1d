"""Lay out the real scans of `../shared/data` as their providers distribute them (symlinks), so
`make prepare` runs on them unchanged: `python -m data_prep.shared_layout --out RAW`.

    RAW/ixi/IXI002-Guys-0828-{T1,T2}.nii.gz     (HD-BET-stripped upstream: --skull-strip none)
    RAW/wmh/{Utrecht/0,GE3T/100}/{pre/T1,wmh}.nii.gz                 (not skull-stripped)
    RAW/mslub/patient07, patient19              (open_ms_data `_brain_` derivatives)
    RAW/brats21/BraTS2021_99901/BraTS2021_99901_{t1,t2,seg}.nii.gz   (BraTS-preprocessed)

The WMH and BraTS lesion masks there are pseudo-labels of other models (see each folder's
README): fine for running the pipeline, not for metrics. The BraTS case's labels use the 2023
convention (3 = enhancing); its seg is written (not linked) with 3 -> 4, BraTS 2021's label.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from p2l.errors import DataError, P2LError

_IXI = "ixi_defacing_pipeline/data/example_input_hdbet_processed"
_WMH = "wmh_ibbmtum_examples"
_MSLUB = "mslub_open_ms_data/cross_sectional/MNI"
_BRATS = "brats_orchestrator_case"


def link(target: Path, source: Path) -> None:
    """`target` becomes a symlink to `source` (which must exist), replacing what was there."""
    if not source.is_file() and not source.is_dir():
        raise DataError(source, "expected file of ../shared/data is missing")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source.resolve())


def make_layout(shared: Path, out: Path) -> dict[str, Path]:
    """Create the four raw layouts under `out`; returns dataset key -> raw folder."""
    shared, out = Path(shared), Path(out)
    if not shared.is_dir():
        raise DataError(shared, "shared data folder not found")
    ixi = shared / _IXI
    for modality in ("T1", "T2"):
        name = f"IXI002-Guys-0828-{modality}"
        link(out / "ixi" / f"{name}.nii.gz", ixi / name / f"hd_bet_{name}.nii.gz")
    wmh = shared / _WMH
    for site, sub in (("Utrecht/0", "sub-0001"), ("GE3T/100", "sub-0002")):
        link(out / "wmh" / site / "pre/T1.nii.gz", wmh / f"input_dir/{sub}/anat/{sub}_T1.nii.gz")
        link(
            out / "wmh" / site / "wmh.nii.gz",
            wmh / f"output_dir/{sub}/derivatives/{sub}_seg.nii.gz",
        )
    for patient in ("patient07", "patient19"):
        link(out / "mslub" / patient, shared / _MSLUB / patient)
    case = "BraTS2021_99901"
    brats = shared / _BRATS
    folder = out / "brats21" / case
    link(folder / f"{case}_t1.nii.gz", brats / "data/preprocessed_case/t1n.nii.gz")
    link(folder / f"{case}_t2.nii.gz", brats / "data/preprocessed_case/t2w.nii.gz")
    labels = nib.load(brats / "outputs/segmentation.nii.gz")
    data = np.asarray(labels.dataobj).copy()
    data[data == 3] = 4
    nib.save(nib.Nifti1Image(data, labels.affine, labels.header), folder / f"{case}_seg.nii.gz")
    return {key: out / key for key in ("ixi", "wmh", "mslub", "brats21")}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.shared_layout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--shared", default=str(default), help=f"default {default}")
    parser.add_argument("--out", required=True, help="folder for the raw layouts")
    args = parser.parse_args(argv)
    try:
        for key, folder in make_layout(Path(args.shared), Path(args.out)).items():
            print(f"{key}: {folder}")
    except P2LError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
