"""The 2 mm working grid and given brain masks on real scans: IXI Hammersmith T1 heads (2 mm, PSR,
uint8, DLMUSE parcellations) and one BraTS 2015 DeepMedic case (z-scored T1c, brainmask).

The raw folder is a symbolic link whose folders link into ../shared (as a user would lay it out);
one IXI subject's DLMUSE file is left out, which must fail that subject alone. Registration runs
its two coarsest levels and N4 one short level (tests/data_prep_real.py FAST): about 15 s in all.
"""

from __future__ import annotations

import contextlib
import io
import json
import time

import ants
import nibabel as nib
import numpy as np
import pytest

from data_prep import prepare, validate
from data_prep.manifest import read_manifest
from tests.data_prep_real import FAST, SHARED, require_shared

HH = SHARED / "data/ixi_hh_t1_2mm"
HH_T1 = HH / "test_data/processed/IXI/Nifti/T1"
HH_DLMUSE = HH / "test_data/processed/IXI/DLMUSE"
NO_MASK = "IXI162-HH-1548"  # its DLMUSE lies in sample_datasets/, which the raw folder omits
GOOD = ("IXI013-HH-1212", "IXI014-HH-1236")
BRATS = SHARED / "data/brats2015_deepmedic/examples/dataForExamples/brats2015TrainingData"
CASE = "brats_2013_pat0005_1"


def _run(argv: list[str]) -> tuple[int, str, float]:
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        status = prepare.main(argv)
    return status, err.getvalue(), time.perf_counter() - start


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    require_shared(HH)
    root = tmp_path_factory.mktemp("ixi_hh")
    real = root / "raw_real"
    (real / "T1").mkdir(parents=True)
    for sid in GOOD:
        (real / "T1" / f"{sid}_T1.nii.gz").symlink_to(HH_T1 / f"{sid}_T1.nii.gz")
    no_mask_t1 = HH / f"sample_datasets/demo_dataset_IXI/t1/{NO_MASK}_T1.nii.gz"
    (real / "T1" / f"{NO_MASK}_T1.nii.gz").symlink_to(no_mask_t1)
    (real / "DLMUSE").symlink_to(HH_DLMUSE)  # a linked folder inside RAW
    (root / "raw").symlink_to(real)  # and RAW itself a link
    out = root / "out"
    argv = ["--dataset", "ixi", "--raw", str(root / "raw"), "--out", str(out), "--spacing", "2"]
    argv += ["--skull-strip", "given-mask", *FAST]
    status, stderr, seconds = _run(argv)
    return {"argv": argv, "out": out, "status": status, "stderr": stderr, "seconds": seconds}


def test_outputs_are_on_the_2mm_grid_and_validate(hh):
    folder = hh["out"] / "Train/ixi"
    rows = read_manifest(folder)
    assert sorted(rows) == [(sid, "t1") for sid in GOOD]
    for row in rows.values():
        assert row["spacing_mm"] == 2.0 and row["config"]["spacing"] == 2.0
        assert row["atlas"]["working_spacing_mm"] == 2.0
        for record in row["outputs"].values():
            assert record["spacing"] == [2.0, 2.0, 2.0]
            # The MNI brain at 2 mm is 99 x 117 x 95 voxels; a brain crop is about 75 x 93 x 80.
            assert all(55 <= n <= 99 for n in record["shape"]), record["shape"]
        image = nib.load(folder / row["outputs"]["image"]["path"])
        assert image.header.get_zooms()[:3] == (2.0, 2.0, 2.0)
        assert "".join(nib.aff2axcodes(image.affine)) == "LPS"  # ITK's RAI
    assert validate.main([str(hh["out"]), "--spacing", "2"]) == 0
    assert validate.main([str(hh["out"]), "--spacing", "1"]) == 1


def test_given_mask_is_recorded_and_equals_the_warped_dlmuse(hh):
    folder = hh["out"] / "Train/ixi"
    for (sid, _), row in read_manifest(folder).items():
        strip = row["skull_strip"]
        assert strip["method"] == "given-mask"
        assert strip["quality"].startswith("provided mask: ") and "pseudo-label" in strip["quality"]
        assert row["source"]["brain_mask"].endswith(f"{sid}_T1_DLMUSE.nii.gz")
        # Carry the DLMUSE brain (label > 0) to the output grid with the recorded affine.
        affine = next(s for s in row["steps"] if s["name"] == "register")["result"]["affine"]
        transform = ants.create_ants_transform(
            transform_type="AffineTransform",
            dimension=3,
            matrix=np.array(affine["matrix"]),
            translation=affine["translation"],
            center=affine["center"],
        )
        output = ants.image_read(str(folder / row["outputs"]["mask"]["path"]))
        dlmuse = ants.image_read(str(HH_DLMUSE / f"{sid}_T1_DLMUSE.nii.gz"))
        brain = dlmuse.new_image_like((dlmuse.numpy() > 0).astype(np.float32))
        warped = ants.apply_ants_transform_to_image(transform, brain, output, "linear")
        a, b = output.numpy() >= 0.5, warped.numpy() >= 0.5
        assert 2 * np.sum(a & b) / (a.sum() + b.sum()) > 0.95


def test_a_missing_given_mask_fails_that_subject_only(hh):
    assert hh["status"] == 1
    assert "prepared 2 scans, skipped 0 up to date, failures: 1" in hh["stderr"]
    # Reported when it happens and again in the final summary: the same one line each time.
    lines = {line.strip() for line in hh["stderr"].splitlines() if "FAILED" in line}
    assert len(lines) == 1, hh["stderr"]
    (line,) = lines
    assert line.startswith(f"FAILED {NO_MASK} t1: ")
    assert f"{NO_MASK}_T1.nii.gz: --skull-strip given-mask: no brain mask file" in line
    assert f"expected {NO_MASK}_T1_DLMUSE.nii.gz" in line
    assert not list((hh["out"] / "Train/ixi").rglob(f"{NO_MASK}*"))


def test_restart_skips_prepared_scans(hh):
    folder = hh["out"] / "Train/ixi"
    before = (folder / "manifest.jsonl").read_text()
    status, stderr, seconds = _run(hh["argv"])
    assert status == 1  # the subject without a mask still fails, and only it
    assert "prepared 0 scans, skipped 2 up to date, failures: 1" in stderr
    assert (folder / "manifest.jsonl").read_text() == before
    assert seconds < 10, seconds


def test_brats15_case_z_scored_t1c(tmp_path):
    require_shared(BRATS)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / CASE).symlink_to(BRATS / "train" / CASE)
    out = tmp_path / "out"
    argv = ["--dataset", "brats15", "--raw", str(tmp_path / "raw"), "--out", str(out)]
    status, stderr, _ = _run(argv + ["--modalities", "t1c", "--spacing", "2", *FAST])
    assert status == 0, stderr
    folder = out / "Test/BraTS15"
    row = read_manifest(folder)[(CASE, "t1c")]
    assert row["skull_strip"]["method"] == "given-mask"  # auto: the case's brainmask.nii.gz
    assert row["source"]["brain_mask"].endswith(f"{CASE}/brainmask.nii.gz")
    shift = next(s for s in row["steps"] if s["name"] == "shift_positive")
    assert shift["result"]["brain_min_before"] < 0 < shift["result"]["offset"]
    image = np.asarray(nib.load(folder / "t1c" / f"{CASE}_t1c.nii.gz").dataobj)
    seg = np.asarray(nib.load(folder / "seg" / f"{CASE}_seg.nii.gz").dataobj)
    mask = np.asarray(nib.load(folder / "mask" / f"{CASE}_mask.nii.gz").dataobj)
    assert image.min() >= 0 and image[mask > 0].mean() > 0
    assert seg.sum() > 1000 and set(np.unique(seg)) == {0, 1}
    assert np.mean(mask[seg > 0] > 0) > 0.99
    assert row["outputs"]["image"]["spacing"] == [2.0, 2.0, 2.0]
    json.dumps(row)  # the row is plain JSON
    assert validate.main([str(out)]) == 0
