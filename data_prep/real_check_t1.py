"""Real-data check at 2 mm: a T1 model from 138 real healthy IXI heads, tested on real lesions.

    .venv/bin/python -m data_prep.real_check_t1 --shared ../shared --workdir runs/real_check_t1

1. Preparation with data_prep's own pipeline (spec §2.1) at a 2 mm working grid: the raw IXI
   Hammersmith T1 heads of `ixi_hh_t1_2mm` (native space, with skull; brain = their DLMUSE
   parcellation > 0, the `given-mask` method), the two MSLUB patients' T1 scans (expert masks) and
   the four BraTS 2015 cases' T1c (a modality-shifted extra). Cached by data_prep's manifests: a
   second run checks the files and skips them (seconds).
2. Split CSVs in the reference's format: 118 training, 10 validation (validation loss and the
   healthy q98 threshold) and 10 healthy test subjects (what fraction of a held-out healthy brain
   each threshold flags), a fixed seeded permutation of the sorted subject ids. Lesion cases are
   only in the test CSVs; no lesion set has a validation CSV, so nothing is tuned on lesions.
3. Training of experiments/t1_2mm.py (`:cpu` by default), evaluation (per-volume metrics, the
   healthy test, the uncertainty report in results/uncertainty/), and one table per case.

`--train-subjects N --held-out-subjects M` prepare and use fewer subjects (the CI form).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from data_prep.real_check import IXI_HEADER, train_and_report, with_inputs
from data_prep.shared_layout import link
from p2l.errors import DataError

IXI_HH = "ixi_hh_t1_2mm"
MSLUB = "mslub_open_ms_data/cross_sectional/MNI"
BRATS15 = "brats2015_deepmedic/examples/dataForExamples/brats2015TrainingData"
MSLUB_PATIENTS = ("patient07", "patient19")
SPLIT_SEED = 138
TRAIN, HELD_OUT = 118, 10  # 118 + 10 validation + 10 healthy test = 138
LESION_HEADER = ",img_name,label,age,img_path,mask_path,seg_path"


def raw_layout(shared: Path, raw: Path) -> dict[str, Path]:
    """Symlinks to the shared scans as data_prep's adapters read them; dataset -> raw folder."""
    data = shared / "data"
    link(raw / "ixi" / IXI_HH, data / IXI_HH)
    for patient in MSLUB_PATIENTS:
        link(raw / "mslub" / patient, data / MSLUB / patient)
    for case in sorted((data / BRATS15).glob("*/brats_*")):
        link(raw / "brats15" / case.name, case)
    return {"ixi": raw / "ixi", "mslub": raw / "mslub", "brats15": raw / "brats15"}


def ixi_ids(shared: Path) -> list[str]:
    """The healthy subjects' ids, sorted (from the T1 file names)."""
    names = (shared / "data" / IXI_HH).rglob("IXI*_T1.nii.gz")
    return sorted(p.name[: -len("_T1.nii.gz")] for p in names)


def split_ids(ids: list[str], train: int = TRAIN, held_out: int = HELD_OUT):
    """(train, validation, healthy test) ids: a fixed permutation of the sorted ids, cut."""
    if train + 2 * held_out > len(ids):
        raise ValueError(f"{train} + 2 x {held_out} subjects asked, {len(ids)} available")
    ids = sorted(ids)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(ids))
    chosen = [ids[i] for i in order]
    return (sorted(chosen[:train]), sorted(chosen[train : train + held_out]),
            sorted(chosen[train + held_out : train + 2 * held_out]))  # fmt: skip


def _prepare(dataset: str, raw: Path, out: Path, extra: list[str], fast: bool) -> None:
    argv = ["--dataset", dataset, "--raw", str(raw), "--out", str(out), "--spacing", "2"] + extra
    if fast:  # the CI form: the two coarsest registration levels, one short N4 level
        argv += ["--registration-iterations", "100,50", "--n4-iterations", "20"]
    # Its own process: data_prep.prepare sets up logging (INFO) and ITK threads for itself.
    status = subprocess.run([sys.executable, "-m", "data_prep.prepare", *argv]).returncode
    if status != 0:
        raise DataError(raw, f"data_prep.prepare --dataset {dataset} failed (status {status})")


def prepare(shared: Path, out: Path, train: int = TRAIN, held_out: int = HELD_OUT,
            workers: int = 2, fast: bool = False) -> tuple[Path, Path]:  # fmt: skip
    """Prepares the scans (cached) and writes the split CSVs; returns (data_root, splits)."""
    data_root, splits = out / "data", out / "splits"
    raws = raw_layout(shared, out / "raw")
    parts = split_ids(ixi_ids(shared), train, held_out)
    used = [sid for part in parts for sid in part]
    common = ["--workers", str(workers), "--no-progress"]
    listing = out / "ixi_subjects.txt"
    listing.write_text("\n".join(used) + "\n")
    ixi_args = ["--modalities", "t1", "--skull-strip", "given-mask", "--subjects", str(listing)]
    _prepare("ixi", raws["ixi"], data_root, common + ixi_args, fast)
    _prepare("mslub", raws["mslub"], data_root, common + ["--modalities", "t1"], fast)
    _prepare("brats15", raws["brats15"], data_root, common + ["--modalities", "t1c"], fast)
    write_splits(splits, parts, data_root)
    return data_root, splits


def write_splits(splits: Path, parts, data_root: Path) -> None:
    """The reference's CSVs: IXI fold 0 train/val, IXI test, and the two lesion test sets."""
    splits.mkdir(parents=True, exist_ok=True)
    for name, ids in zip(("IXI_train_fold0.csv", "IXI_val_fold0.csv", "IXI_test.csv"), parts):
        # Demographics are unknown here: empty fields (the loader reads the file columns only).
        rows = [f"{i},{sid}_t1.nii.gz,,,,,,,,,,,0,"
                f"/Train/ixi/t1/{sid}_t1.nii.gz,/Train/ixi/mask/{sid}_mask.nii.gz,,"
                for i, sid in enumerate(ids)]  # fmt: skip
        (splits / name).write_text(IXI_HEADER + "\n" + "\n".join(rows) + "\n")
    (splits / "avail_t2.csv").write_text(",0\n")  # a T1 run: no T2 scans
    for dataset, mod, cases in (("MSLUB", "t1", MSLUB_PATIENTS), ("BraTS15", "t1c", None)):
        folder = f"/Test/{dataset}"
        if cases is None:  # every prepared case
            found = sorted((data_root / folder.lstrip("/") / mod).glob(f"*_{mod}.nii.gz"))
            cases = [p.name[: -len(f"_{mod}.nii.gz")] for p in found]
        rows = [f"{i},{case},1,,{folder}/{mod}/{case}_{mod}.nii.gz,"
                f"{folder}/mask_{mod}/{case}_mask.nii.gz,{folder}/seg_{mod}/{case}_seg.nii.gz"
                for i, case in enumerate(cases)]  # fmt: skip
        (splits / f"{dataset}_test.csv").write_text(LESION_HEADER + "\n" + "\n".join(rows) + "\n")


def configure(variant: str, data_root: Path, splits: Path, tfds_dir: Path, **overrides):
    """experiments/t1_2mm.py:<variant> on the prepared data, with dotted-key overrides."""
    from experiments.t1_2mm import get_config

    return with_inputs(get_config(variant), data_root, splits, tfds_dir, **overrides)


def configure_dae(variant: str, data_root: Path, splits: Path, tfds_dir: Path, **overrides):
    """experiments/dae_t1_2mm.py:<variant> (the DAE fused with Patch2Loc) on the same data."""
    from experiments.dae_t1_2mm import get_config

    return with_inputs(get_config(variant), data_root, splits, tfds_dir, **overrides)


def run(shared: Path, workdir: Path, variant: str = "cpu", train: int = TRAIN,
        held_out: int = HELD_OUT, fast_prep: bool = False, dae: bool = True,
        **overrides) -> list[dict]:  # fmt: skip
    """Prepares (cached), trains Patch2Loc (and the DAE, fused with it, when `dae`), evaluates;
    prints and returns the per-case rows (one per case and detector)."""
    data_root, splits = prepare(shared, workdir / "input", train, held_out, fast=fast_prep)
    tfds_dir = workdir / "input" / "tfds"
    config = configure(variant, data_root, splits, tfds_dir, **overrides)
    dae_config = configure_dae(variant, data_root, splits, tfds_dir) if dae else None
    return train_and_report(config, workdir / "run", dae_config, workdir / "dae")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default="../shared", help="the shared folder with data/")
    ap.add_argument("--workdir", default="runs/real_check_t1")
    ap.add_argument("--variant", default="cpu", help="of experiments/t1_2mm.py: cpu, tiny, ''")
    ap.add_argument("--train-subjects", type=int, default=TRAIN)
    ap.add_argument("--held-out-subjects", type=int, default=HELD_OUT)
    ap.add_argument("--fast-prep", action="store_true", help="short registration and N4 (CI)")
    ap.add_argument("--prepare-only", action="store_true", help="prepare the scans and CSVs")
    ap.add_argument("--no-dae", action="store_true", help="Patch2Loc alone, no DAE or fusion")
    args = ap.parse_args(argv)
    from p2l import xla_flags

    xla_flags.apply()  # the entry points' XLA:CPU flags, before JAX starts its backend
    if not (Path(args.shared) / "data" / IXI_HH).is_dir():
        print(f"error: {args.shared}/data/{IXI_HH} not found", file=sys.stderr)
        return 1
    shared, workdir = Path(args.shared), Path(args.workdir)
    if args.prepare_only:
        prepare(shared, workdir / "input", args.train_subjects, args.held_out_subjects,
                fast=args.fast_prep)  # fmt: skip
        return 0
    run(shared, workdir, args.variant, args.train_subjects, args.held_out_subjects,
        args.fast_prep, dae=not args.no_dae)  # fmt: skip
    held_out = split_ids(ixi_ids(shared), args.train_subjects, args.held_out_subjects)[2][0]
    raw = next((shared / "data" / IXI_HH).rglob(f"{held_out}_T1.nii.gz"))
    print(f"A lesion map for a raw head, straight from the scanner (here a held-out healthy one):\n"
          f"  python -m p2l.detect --workdir {workdir / 'run'} --input {raw} "
          f"--output {workdir / 'detect' / held_out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
