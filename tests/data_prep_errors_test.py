"""Corrupt, truncated and mismatched inputs give one clear error naming the file; a failing
subject is reported and counted while the others are prepared."""

from __future__ import annotations

import gzip
import os
import stat

import nibabel as nib
import numpy as np
import pytest

from data_prep import prepare, validate
from data_prep.manifest import file_record, write_manifest
from p2l.errors import DataError
from p2l.preparation.ants_io import read_ants
from p2l.preparation.atlas import load_atlas
from tests import data_prep_phantom as phantom


def _valid(path, data=None, affine=None):
    data = (
        np.random.default_rng(0).random((12, 12, 12)).astype(np.float32) if data is None else data
    )
    return phantom.save(path, data, np.eye(4) if affine is None else affine)


def test_missing_corrupt_truncated_and_wrong_shape_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"absent\.nii\.gz: image file not found"):
        read_ants(tmp_path / "absent.nii.gz", "image")

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file" * 100)
    with pytest.raises(DataError, match=r"corrupt\.nii\.gz: cannot read as NIfTI"):
        read_ants(corrupt, "image")

    whole = _valid(tmp_path / "whole.nii.gz").read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"truncated\.nii\.gz: cannot read as NIfTI"):
        read_ants(truncated, "image")

    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), four_d)
    with pytest.raises(DataError, match=r"four_d\.nii\.gz: expected a 3-D volume"):
        read_ants(four_d, "image")

    data = np.ones((5, 5, 5), np.float32)
    data[2, 2, 2] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        read_ants(_valid(tmp_path / "nan.nii.gz", data), "image")


def test_mislabelled_compression_errs_and_singleton_4d_is_read(tmp_path):
    plain = _valid(tmp_path / "plain.nii.gz")
    plain.write_bytes(gzip.decompress(plain.read_bytes()))  # an exporter forgot to compress
    with pytest.raises(DataError, match=r"plain\.nii\.gz: .*not a gzip file"):
        read_ants(plain, "image")
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 7, 8, 1), np.float32), np.diag([2, 2, 2, 1])), single)
    image = read_ants(single, "image")
    assert image.shape == (6, 7, 8) and np.allclose(image.spacing, 2.0)


def test_segmentation_must_hold_integer_labels(tmp_path):
    probabilities = np.random.default_rng(1).random((6, 6, 6)).astype(np.float32)
    with pytest.raises(DataError, match="non-negative integer labels"):
        read_ants(_valid(tmp_path / "seg.nii.gz", probabilities), "seg")
    labels = np.zeros((6, 6, 6), np.float32)
    labels[1, 1, 1] = -1
    with pytest.raises(DataError, match="non-negative integer labels"):
        read_ants(_valid(tmp_path / "neg.nii.gz", labels), "seg")


def test_atlas_must_be_a_1mm_brain_extracted_template(tmp_path):
    head = np.random.default_rng(2).random((100, 100, 100)).astype(np.float32) + 1.0
    with pytest.raises(DataError, match="brain-extracted"):
        load_atlas(_valid(tmp_path / "head.nii.gz", head))
    brain, _, affine = phantom.scan((70, 80, 60), (2.0, 2.0, 2.0), "RAS")
    with pytest.raises(DataError, match="1 mm isotropic"):
        load_atlas(phantom.save(tmp_path / "coarse.nii.gz", brain, affine))


@pytest.fixture(scope="module")
def mixed_raw(tmp_path_factory):
    """A BraTS raw folder with one good case, one truncated scan, one seg on another grid."""
    root = tmp_path_factory.mktemp("errors")
    atlas = phantom.atlas(root / "atlas.nii.gz")
    raw = phantom.write_raw_brats(root / "raw", "BraTS2021_00001")
    bad = phantom.write_raw_brats(root / "raw", "BraTS2021_00002") / "BraTS2021_00002"
    t2 = bad / "BraTS2021_00002_t2.nii.gz"
    t2.write_bytes(t2.read_bytes()[:5000])
    seg = bad / "BraTS2021_00002_seg.nii.gz"
    img = nib.load(seg)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :100], img.affine), seg)
    return root, raw, atlas


def test_one_failing_subject_is_reported_and_counted_not_dropped(mixed_raw, capsys):
    root, raw, atlas = mixed_raw
    out = root / "out"
    argv = ["--dataset", "brats21", "--raw", str(raw), "--out", str(out), "--atlas", str(atlas)]
    status = prepare.main(argv + ["--modalities", "t2"] + phantom.FAST_ARGS)

    err = capsys.readouterr().err
    assert status == 1
    assert "prepared 1 scans" in err and "failures: 1" in err
    # The failing subject names its bad file and the problem, in one line.
    assert "FAILED BraTS2021_00002 t2:" in err
    assert "BraTS2021_00002_t2.nii.gz: cannot read as NIfTI" in err
    assert "Traceback" not in err
    assert (out / "Test/Brats21/t2/BraTS2021_00001_t2.nii.gz").is_file()
    assert not (out / "Test/Brats21/t2/BraTS2021_00002_t2.nii.gz").exists()


def test_seg_on_another_grid_is_a_clear_error(mixed_raw, capsys):
    root, raw, atlas = mixed_raw
    bad = raw / "BraTS2021_00002"
    good_t1 = raw / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz"
    (bad / "BraTS2021_00002_t1.nii.gz").write_bytes(good_t1.read_bytes())
    argv = [
        "--dataset",
        "brats21",
        "--raw",
        str(raw),
        "--out",
        str(root / "out_seg"),
        "--atlas",
        str(atlas),
        "--modalities",
        "t1",
        "--subjects",
        "BraTS2021_00002",
    ]
    assert prepare.main(argv + phantom.FAST_ARGS) == 1
    err = capsys.readouterr().err
    assert "BraTS2021_00002_seg.nii.gz: lesion mask is not on the grid of its scan" in err
    assert "shape (124, 140, 100) vs (124, 140, 104)" in err


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    cases = [
        (["--dataset", "oasis"], "config.dataset: unknown dataset 'oasis'"),
        (["--dataset", "wmh", "--raw", str(tmp_path / "nope")], "raw wmh folder not found"),
        (["--dataset", "wmh", "--raw", str(raw)], "no wmh scans found"),
        (["--dataset", "ixi", "--raw", str(raw), "--modalities", "flair"], "config.modalities"),
        (
            ["--dataset", "ixi", "--raw", str(raw), "--registration-iterations", "9,9,9,9,9"],
            "config.registration_iterations",
        ),
    ]
    for extra, message in cases:
        argv = ["--raw", str(raw), "--out", str(tmp_path / "out")] + extra
        assert prepare.main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    monkeypatch.setenv("PATH", str(tmp_path))  # no hd-bet anywhere
    argv = [
        "--dataset",
        "ixi",
        "--raw",
        str(raw),
        "--out",
        str(tmp_path),
        "--skull-strip",
        "hd-bet",
    ]
    assert prepare.main(argv) == 2
    assert "hd-bet requested but not installed" in capsys.readouterr().err


def test_failing_hd_bet_is_reported_with_its_message(mixed_raw, tmp_path, capsys, monkeypatch):
    root, _, atlas = mixed_raw
    raw = phantom.write_raw_ixi(tmp_path / "raw", {"IXI900-Synth-0001": ("T1",)})
    fake = tmp_path / "bin" / "hd-bet"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'RuntimeError: CUDA device not available' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    argv = [
        "--dataset",
        "ixi",
        "--raw",
        str(raw),
        "--out",
        str(tmp_path / "out"),
        "--atlas",
        str(atlas),
        "--skull-strip",
        "hd-bet",
    ]
    assert prepare.main(argv + phantom.FAST_ARGS) == 1
    err = capsys.readouterr().err
    assert "hd-bet failed (exit 3): RuntimeError: CUDA device not available" in err


def _prepared_ixi(root):
    """A prepared IXI folder (one T1 scan, its mask and the mask/ link) with its manifest."""
    folder = root / "Train/ixi"
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # 1 mm, LPS (RAI)
    image = np.random.default_rng(3).random((40, 40, 40)).astype(np.float32)
    mask = np.zeros((40, 40, 40), np.float32)
    mask[8:32, 8:32, 8:32] = 1
    subject = "IXI901-Synth-0001"
    paths = {
        "image": phantom.save(folder / f"t1/{subject}_t1.nii.gz", image, affine),
        "mask": phantom.save(folder / f"mask_t1/{subject}_mask.nii.gz", mask, affine),
    }
    phantom.save(folder / f"mask/{subject}_mask.nii.gz", mask, affine)
    outputs = {kind: file_record(path, folder) for kind, path in paths.items()}
    write_manifest(
        folder, {(subject, "t1"): {"subject": subject, "modality": "t1", "outputs": outputs}}
    )
    return folder, paths


def test_quick_validation_catches_truncated_files(tmp_path, capsys, monkeypatch):
    folder, paths = _prepared_ixi(tmp_path)
    with monkeypatch.context() as mp:  # intact files: their gzip trailer suffices, no stream read
        mp.setattr(validate, "_gzip_length", None)
        assert validate.main([str(tmp_path), "--quick"]) == 0
    whole = paths["image"].read_bytes()
    paths["image"].write_bytes(whole[: len(whole) // 2])  # the header still reads
    assert validate.main([str(tmp_path), "--quick"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR IXI901-Synth-0001 t1: {paths['image']}: truncated or corrupt gzip stream" in out
    assert "Traceback" not in out

    paths["image"].write_bytes(whole[:100])  # not even a header
    shared = folder / "mask/IXI901-Synth-0001_mask.nii.gz"
    shared.write_bytes(shared.read_bytes()[:-8])  # the gzip trailer cut off
    assert validate.main([str(tmp_path), "--quick"]) == 1
    out = capsys.readouterr().out
    assert f"{paths['image']}: cannot read the NIfTI header" in out
    assert f"ERROR IXI901-Synth-0001: {shared}: truncated" in out

    # Uncompressed .nii: the file must hold the header's voxels.
    plain = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), plain)
    assert validate._truncation(plain, plain.stat().st_size) is None
    plain.write_bytes(plain.read_bytes()[:-4])
    assert validate._truncation(plain, 352 + 8**3 * 4) == "truncated: 2396 of 2400 bytes"


def test_quick_validation_reads_multi_member_gzip_files_whole(tmp_path):
    # A valid file whose gzip trailer does not give the total length: read once, accepted.
    path = tmp_path / "two_members.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "x.nii")
    raw = (tmp_path / "x.nii").read_bytes()
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert validate._truncation(path, len(raw)) is None
    assert (
        validate._truncation(path, len(raw) + 1) == f"truncated: {len(raw)} of {len(raw) + 1} bytes"
    )
