"""Real-data check: train briefly on the one real healthy scan we have, detect on real lesions.

    .venv/bin/python -m data_prep.real_check --shared ../shared --workdir runs/real_check

Training data: IXI002 T2 (healthy, HD-BET skull-stripped) from ../shared/data — the only real
healthy subject available. No slices of the lesion subjects are used for training, even
lesion-free ones: they would leak each test subject's own appearance into the model.
Test data, with expert masks: the two MSLUB patients (T2, consensus lesion masks) and the four
BraTS 2015 cases (FLAIR standing in for T2: they ship no T2; whole tumour = labels > 0).

The scans are reoriented to RAS, resampled to 1 mm (B-spline for images, linear for masks,
nearest for labels) and cut to the brain bounding box — a quick stand-in for data_prep's
registration — then go through the normal code path (tfds build, load-time normalisation,
training, heatmaps at stride 8, post-processing, metrics). With one training subject the model
cannot generalise; the check is that the code runs on real scans and that lesion voxels score
higher than the rest of the brain. Numbers are printed per case and written to
<workdir>/run/results/. The config (steps, learning rate, stride) is experiments/real_check.py;
tests/real_check_test.py runs this check (`make test-slow`).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np

from experiments.real_check import get_config

IXI_T2 = "ixi_defacing_pipeline/data/example_input_hdbet_processed/IXI002-Guys-0828-T2"
MSLUB = "mslub_open_ms_data/cross_sectional/MNI"
BRATS = "brats2015_deepmedic/examples/dataForExamples/brats2015TrainingData"
IXI_HEADER = (
    ',img_name,"SEX_ID (1=m, 2=f)",HEIGHT,WEIGHT,ETHNIC_ID,MARITAL_ID,OCCUPATION_ID,'
    "QUALIFICATION_ID,DATE_AVAILABLE,STUDY_DATE,age,label,img_path,mask_path,seg_path,Agegroup"
)


def _canonical_1mm(path: Path, order: int) -> nib.Nifti1Image:
    img = nib.as_closest_canonical(nib.load(str(path)))
    if np.allclose(img.header.get_zooms()[:3], 1.0, atol=1e-3):
        return img
    return nibabel.processing.resample_to_output(img, voxel_sizes=(1.0, 1.0, 1.0), order=order)


def _cut(arrays: list[np.ndarray], mask: np.ndarray, affine: np.ndarray):
    """Crop to the bounding box of the brain mask (spec §2.1 step 4, without its off-by-one)."""
    idx = np.nonzero(mask > 0)
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array(lo) + affine[:3, 3]
    return [a[sl] for a in arrays], shifted


def _write_case(root: Path, group: str, sid: str, image, mask, seg=None) -> dict:
    """Writes one case in the reference layout; returns its CSV paths."""
    from p2l.volume_io import write_volume_atomic

    mask_data = np.clip(mask.get_fdata(dtype=np.float32), 0, 1)
    image_data = image.get_fdata(dtype=np.float32) * (mask_data > 0)
    arrays = [image_data, mask_data]
    if seg is not None:
        arrays.append((seg.get_fdata(dtype=np.float32) > 0.5).astype(np.float32))
    arrays, affine = _cut(arrays, mask_data, image.affine)
    inside = arrays[1] > 0
    # z-scored inputs (BraTS) have negative brain values: shift so the brain is >= 0 and the
    # background 0, like the raw intensities Nyúl's landmarks were trained on (spec §2.2).
    arrays[0] = np.where(inside, arrays[0] - min(0.0, float(arrays[0][inside].min())), 0.0)
    paths = {}
    for kind, array in zip(("t2", "mask", "seg"), arrays):
        rel = f"/{group}/{kind}/{sid}_{kind}.nii.gz"
        write_volume_atomic(root / rel.lstrip("/"), array, affine)
        paths[kind] = rel
    return paths


def prepare(shared: Path, out: Path) -> tuple[Path, Path]:
    """Writes the reference layout and split CSVs for the check; returns (data_root, splits)."""
    data_root, splits = out / "data", out / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    d = shared / "data"
    ixi = d / IXI_T2
    p = _write_case(
        data_root,
        "Train/ixi",
        "IXI002-Guys-0828",
        _canonical_1mm(ixi / "hd_bet_IXI002-Guys-0828-T2.nii.gz", 3),
        _canonical_1mm(ixi / "hd_bet_mask_IXI002-Guys-0828-T2.nii.gz", 1),
    )
    t1_path = p["t2"].replace("t2", "t1")  # the CSV names the T1 file (spec §1.1)
    row = f"0,IXI002-Guys-0828_t1.nii.gz,1,0,0,1,2,1,4,1,2005-06-23,35.8,0,{t1_path}"
    row += f",{p['mask']},,2.0"
    for name in ("IXI_train_fold0.csv", "IXI_val_fold0.csv", "IXI_test.csv"):
        (splits / name).write_text(IXI_HEADER + "\n" + row + "\n")
    (splits / "avail_t2.csv").write_text(",0\n0,IXI002-Guys-0828_t2.nii.gz\n")
    # The T2 file sits in t2/; the t1 path of the CSV is rewritten t1 -> t2 (spec §1.1).
    lesion_header = ",img_name,label,age,img_path,mask_path,seg_path"
    rows = []
    for i, patient in enumerate(("patient07", "patient19")):
        folder = d / MSLUB / patient
        t2 = _canonical_1mm(next(folder.glob("T2_*.nii.gz")), 3)
        brain = nib.Nifti1Image((np.asarray(t2.dataobj) != 0).astype(np.float32), t2.affine)
        seg = _canonical_1mm(next(folder.glob("GOLD_STANDARD_*.nii.gz")), 0)
        p = _write_case(data_root, "Test/MSLUB", patient, t2, brain, seg)
        rows.append(f"{i},{patient},1,,{p['t2'].replace('/t2/', '/t1/').replace('_t2.', '_t1.')}"
                    f",{p['mask']},{p['seg']}")  # fmt: skip
    (splits / "MSLUB_test.csv").write_text(lesion_header + "\n" + "\n".join(rows) + "\n")
    rows = []
    cases = sorted((d / BRATS).glob("*/brats_*"))
    for i, case in enumerate(cases):
        p = _write_case(
            data_root,
            "Test/BraTS15",
            case.name,
            _canonical_1mm(case / "Flair_subtrMeanDivStd.nii.gz", 3),
            _canonical_1mm(case / "brainmask.nii.gz", 1),
            _canonical_1mm(case / "OTMultiClass.nii.gz", 0),
        )
        rows.append(f"{i},{case.name},1,,{p['t2'].replace('/t2/', '/t1/').replace('_t2.', '_t1.')}"
                    f",{p['mask']},{p['seg']}")  # fmt: skip
    (splits / "BraTS15_test.csv").write_text(lesion_header + "\n" + "\n".join(rows) + "\n")
    return data_root, splits


def with_inputs(config, data_root: Path, splits: Path, tfds_dir: Path, **overrides):
    """`config` with dotted-key overrides, pointed at a check's prepared data, CSVs and builds."""
    from p2l.config_file import set_dotted

    for key, value in overrides.items():
        set_dotted(config, key, value)
    config.data_root, config.splits_dir = str(data_root), str(splits)
    config.tfds_dir = str(tfds_dir)
    return config


def train_and_report(config, run_dir: Path, dae_config=None, dae_dir: Path | None = None):
    """Trains (or resumes), evaluates, prints the summary and the per-case table; returns the
    per-volume rows (dicts of strings). With `dae_config`, the DAE is trained on the same data in
    `dae_dir` first and the evaluation fuses the two (p2l.fusion): rows for every detector."""
    from p2l import evaluate, results_summary, train

    if dae_config is not None:
        train.train_and_evaluate(dae_config, dae_dir)
        config.eval.pixel_workdir = str(dae_dir)
    train.train_and_evaluate(config, run_dir)
    summary = evaluate.evaluate(config, run_dir)
    print(results_summary.format_summary(summary))
    return print_case_table(config, summary, run_dir)


def run(shared: Path, workdir: Path, **overrides) -> list[dict]:
    """Prepares the inputs, trains, evaluates; returns the per-volume rows (dicts of strings)."""
    data_root, splits = prepare(shared, workdir / "input")
    config = with_inputs(get_config(), data_root, splits, workdir / "input" / "tfds", **overrides)
    return train_and_report(config, workdir / "run")


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value in (None, "") or not np.isfinite(float(value)):
        return "n/a"
    return format(float(value), fmt)


def print_case_table(config, summary: dict, run_dir: Path) -> list[dict]:
    """One row per lesion case: AUROC and AUPRC inside the brain (background not counted), Dice
    at the healthy-quantile threshold, the fraction of held-out healthy brain voxels above that
    threshold (the run's healthy test, when it has one), mean score in lesion vs normal brain.
    Returns the per-volume rows (dicts of strings) of the results CSVs."""
    from p2l import thresholds

    healthy = thresholds.healthy_policy_name(config.eval.healthy_quantile)
    primary = summary.get("detector", "patch2loc")
    per_detector = summary.get("detectors") or {primary: summary}
    flagged = {d: res.get("healthy_test", {}).get("thresholds", {}).get(healthy, {})
               .get("pooled_fraction") for d, res in per_detector.items()}  # fmt: skip
    rows = []
    for dataset in config.test_sets:
        with open(run_dir / "results" / f"{dataset.lower()}_volumes.csv") as fh:
            rows += list(csv.DictReader(fh))
    header = ["case", "detector", "lesion voxels", "AUROC (brain)", "AUPRC (brain)",
              f"Dice ({healthy})", f"healthy brain > {healthy}", "score lesion",
              "normal brain"]  # fmt: skip
    values = ", ".join(f"{d} {res['thresholds'][healthy]['value']:.4g}"
                       for d, res in per_detector.items())  # fmt: skip
    print(f"{config.name}: per case (threshold {healthy}: {values})")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        detector = r.get("detector", primary)
        cells = [f"{r['dataset']}/{r['subject_id']}", detector]
        cells.append(str(int(float(r["lesion_voxels"]))))
        cells += [_cell(r, k, ".3f") for k in ("auroc_brain", "auprc_brain", f"dice[{healthy}]")]
        share = flagged.get(detector)
        cells.append("n/a" if share is None else f"{100 * share:.2f} %")
        cells += [_cell(r, k, ".2f") for k in ("score_lesion_mean", "score_normal_brain_mean")]
        print("| " + " | ".join(cells) + " |")
    flagged = flagged.get(primary)
    if flagged is not None:
        held_out = summary["healthy_test"]
        print(f"healthy brain > {healthy}: fraction of the brain voxels of the "
              f"{held_out['volumes']}"
              f" held-out healthy subjects ({held_out['split']}, never trained on, not used for "
              "the threshold) above the threshold, pooled")  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default="../shared", help="the shared folder with data/")
    ap.add_argument("--workdir", default="runs/real_check")
    args = ap.parse_args(argv)
    from p2l import xla_flags

    xla_flags.apply()  # the entry points' XLA:CPU flags, before JAX starts its backend
    if not (Path(args.shared) / "data").is_dir():
        print(f"error: {args.shared}/data not found", file=sys.stderr)
        return 1
    run(Path(args.shared), Path(args.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
