"""Tests for p2l.volume_io: reading with clear errors, grid checks, atomic writes."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from p2l.errors import DataError
from p2l.volume_io import Volume, check_same_grid, read_volume, write_volume_atomic

AFFINE = np.array(
    [[-1.5, 0, 0, 90.0], [0, 1.0, 0, -120.0], [0, 0, 2.0, -60.0], [0, 0, 0, 1]], dtype=np.float64
)


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def _brain(shape=(8, 9, 6)):
    rng = np.random.default_rng(0)
    return (rng.random(shape) * 100).astype(np.float32)


def test_read_volume_round_trip_and_spacing(tmp_path):
    data = _brain()
    path = _save(tmp_path / "img.nii.gz", data.astype(np.int16))
    vol = read_volume(path, kind="image")
    assert vol.data.dtype == np.float32
    assert vol.data.shape == (8, 9, 6)
    np.testing.assert_array_equal(vol.data, data.astype(np.int16).astype(np.float32))
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, (1.5, 1.0, 2.0), atol=1e-6)
    assert vol.path == str(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        read_volume(tmp_path / "nope.nii.gz", kind="image")
    assert "nope.nii.gz" in str(info.value)


def test_truncated_gzip_names_the_file(tmp_path):
    full = _save(tmp_path / "full.nii.gz", _brain((20, 20, 20)))
    truncated = tmp_path / "truncated.nii.gz"
    blob = full.read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        read_volume(truncated, kind="image")
    assert info.value.path == str(truncated)


def test_not_nifti(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"this is not a nifti file")
    with pytest.raises(DataError, match="junk.nii.gz"):
        read_volume(path, kind="image")


def test_nan_voxels_are_counted(tmp_path):
    data = _brain()
    data[0, 0, 0] = np.nan
    data[1, 2, 3] = np.inf
    path = _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(DataError, match="2 non-finite voxels"):
        read_volume(path, kind="image")


def test_two_d_rejected_four_d_singleton_accepted(tmp_path):
    path2d = _save(tmp_path / "flat.nii.gz", np.ones((5, 6), np.float32))
    with pytest.raises(DataError, match="expected a 3-D volume"):
        read_volume(path2d, kind="image")
    data = _brain()
    path4d = _save(tmp_path / "four.nii.gz", data[..., None])
    vol = read_volume(path4d, kind="image")
    assert vol.data.shape == data.shape
    np.testing.assert_array_equal(vol.data, data)
    path4d_real = _save(tmp_path / "series.nii.gz", np.stack([data, data], axis=-1))
    with pytest.raises(DataError, match="expected a 3-D volume"):
        read_volume(path4d_real, kind="image")


def test_mask_checks(tmp_path):
    empty = _save(tmp_path / "empty_mask.nii.gz", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(DataError, match="empty brain mask"):
        read_volume(empty, kind="mask")
    # The same file is a valid seg (a healthy scan has an empty lesion map).
    assert read_volume(empty, kind="seg").data.max() == 0
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 255
    wrong = _save(tmp_path / "mask255.nii.gz", labels)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        read_volume(wrong, kind="mask")
    fractional = np.zeros((4, 4, 4), np.float32)
    fractional[1:3, 1:3, 1:3] = 1.0
    fractional[0, 1, 1] = 0.3
    fractional[3, 1, 1] = 1.0004  # interpolation overshoot within tolerance
    ok = read_volume(_save(tmp_path / "frac.nii.gz", fractional), kind="mask")
    assert ok.data[0, 1, 1] == pytest.approx(0.3)


def test_check_same_grid(tmp_path):
    a = Volume(np.zeros((4, 5, 6), np.float32), AFFINE, "a.nii.gz")
    check_same_grid(a, Volume(np.ones((4, 5, 6), np.float32), AFFINE + 1e-5, "b.nii.gz"))
    with pytest.raises(DataError, match=r"shape \(4, 5, 7\) differs from \(4, 5, 6\)") as info:
        check_same_grid(a, Volume(np.zeros((4, 5, 7), np.float32), AFFINE, "b.nii.gz"))
    assert "a.nii.gz" in str(info.value) and "b.nii.gz" in str(info.value)
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    with pytest.raises(DataError, match="largest difference 0.5") as info:
        check_same_grid(a, Volume(np.zeros((4, 5, 6), np.float32), shifted, "c.nii.gz"))
    assert "a.nii.gz" in str(info.value) and "c.nii.gz" in str(info.value)


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii"])
def test_write_volume_atomic(tmp_path, name):
    data = _brain()
    target = tmp_path / "sub" / name
    write_volume_atomic(target, data, AFFINE)
    assert sorted(os.listdir(target.parent)) == [name]  # no temp file left behind
    vol = read_volume(target, kind="image")
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
    # Overwriting replaces the content; uint8 output keeps the values.
    write_volume_atomic(target, (data > 50).astype(np.float32), AFFINE, dtype=np.uint8)
    assert nib.load(target).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(read_volume(target, kind="seg").data, (data > 50))


def test_write_volume_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "keep.nii.gz"
    write_volume_atomic(target, _brain(), AFFINE)
    before = target.read_bytes()

    def failing_save(img, filename):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", failing_save)
    # One line naming the file (atomic_write turns OSErrors into a DataError).
    with pytest.raises(DataError, match="keep.nii.gz: cannot write: disk full"):
        write_volume_atomic(target, np.zeros((3, 3, 3)), AFFINE)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.nii.gz"]  # the temp file was removed
    with pytest.raises(DataError, match="must end with .nii"):
        write_volume_atomic(tmp_path / "out.npy", _brain(), AFFINE)


def test_axcodes_name_where_each_voxel_axis_points(tmp_path):
    vol = read_volume(_save(tmp_path / "img.nii.gz", _brain()), kind="image")
    assert vol.axcodes == ("L", "A", "S")  # AFFINE's first column points to -x
    permuted = Volume(vol.data, AFFINE[:, [2, 0, 1, 3]], vol.path)
    assert permuted.axcodes == ("S", "L", "A")
