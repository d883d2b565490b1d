"""Tests for p2l.normalization (spec §2.2): curvature flow, Nyúl, crop/pad, rescale, loading."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from p2l.errors import ConfigError, DataError
from p2l.normalization import (
    NYUL_LANDMARKS,
    CropPad,
    curvature_flow,
    histogram_standardize,
    load_subject,
    rescale_intensity,
)
from p2l.volume_io import read_volume

# Anisotropic, with a flipped axis, so that a wrong axis order or spacing shows.
AFFINE = np.array(
    [[-1.2, 0, 0, 10.0], [0, 0.9, 0, -3.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]], dtype=np.float64
)


def _phantom(shape, seed=0):
    """A textured ellipsoid 'brain' on a zero background, and its mask with fractional rim."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    mask = np.clip((0.8 - radius) / 0.1, 0, 1).astype(np.float32)
    image = (300 + 200 * grid[0] + 50 * rng.standard_normal(shape)) * (mask > 0)
    return np.clip(image, 0, None).astype(np.float32), mask


def test_curvature_flow_equals_sitk_on_the_file(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.random((12, 10, 8)) * 100).astype(np.float32)
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    # What the reference's sitk_reader does (spec §2.2).
    ref_image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(
        sitk.CurvatureFlow(image1=ref_image, timeStep=0.125, numberOfIterations=3)
    ).transpose(2, 1, 0)
    vol = read_volume(path, kind="image")
    smoothed = curvature_flow(vol.data, vol.spacing)
    assert smoothed.shape == data.shape
    np.testing.assert_allclose(smoothed, expected, rtol=0, atol=1e-9)
    assert np.abs(smoothed - data).max() > 1  # the filter did something
    # The spacing matters: ignoring it gives a visibly different result.
    assert np.abs(curvature_flow(vol.data, (1.0, 1.0, 1.0)) - expected).max() > 1


def test_nyul_landmarks_are_the_reference_values():
    assert NYUL_LANDMARKS["t2"][7] == pytest.approx(28.40980097)
    assert NYUL_LANDMARKS["t1"][6] == pytest.approx(2.20984358e-04)
    for values in NYUL_LANDMARKS.values():
        assert values.shape == (13,) and values[0] == 0 and values[-1] == 100
        assert np.all(np.diff(values) >= 0)
        assert not values.flags.writeable


def test_histogram_standardize_hand_computed():
    # 101 voxels: one at -5, sixty zeros, then 1..40. np.percentile (linear) at p is the sorted
    # value at index p, so p1..p60 = 0, p70 = 10, p75 = 15, p80 = 20, p90 = 30, p99 = 39.
    data = np.array([-5.0] + [0.0] * 60 + list(range(1, 41)), dtype=np.float32)
    landmarks = np.array([2, 5, 10, 15, 20, 25, 30, 40, 50, 52, 60, 80, 100], dtype=np.float64)
    out = histogram_standardize(data.reshape(1, 101, 1), landmarks).reshape(-1)
    assert out.dtype == np.float32
    lm = dict(zip([1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 99], landmarks, strict=True))
    value = dict(zip(data.tolist(), out.tolist(), strict=False))
    # -5 lies below p1 in the zero-gap segment [p1, p10]: slope 0, so it maps to landmark p1
    # (no division by zero, no extrapolation).
    assert value[-5.0] == pytest.approx(lm[1])
    # 0 is in the last segment starting at 0: [p60 = 0, p70 = 10].
    assert value[0.0] == pytest.approx(lm[60])
    assert value[5.0] == pytest.approx(lm[60] + 5 * (lm[70] - lm[60]) / 10)
    assert value[10.0] == pytest.approx(lm[70])
    # p75 is skipped (torchio uses indices [0,1,2,4,...]): 15 is interpolated between p70 and p80.
    assert value[15.0] == pytest.approx((lm[70] + lm[80]) / 2)
    assert value[15.0] != pytest.approx(lm[75])
    assert value[20.0] == pytest.approx(lm[80])
    assert value[30.0] == pytest.approx(lm[90])
    assert value[39.0] == pytest.approx(lm[99])
    # 40 > p99: extrapolated with the last segment [p90, p99].
    assert value[40.0] == pytest.approx(lm[90] + 10 * (lm[99] - lm[90]) / 9)


def test_histogram_standardize_maps_image_percentiles_onto_landmarks():
    # A shuffled 0..100 volume: the p-th percentile is the voxel with value p.
    rng = np.random.default_rng(1)
    image = rng.permutation(101).astype(np.float32).reshape(101, 1, 1) * 3.0
    for modality in ("t1", "t2"):
        out = histogram_standardize(image, NYUL_LANDMARKS[modality])
        for p, landmark in zip(
            [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99],
            NYUL_LANDMARKS[modality][[0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]],
            strict=True,
        ):
            assert out[image == 3.0 * p][0] == pytest.approx(landmark, abs=1e-4)
    with pytest.raises(ValueError, match="13 landmarks"):
        histogram_standardize(image, np.zeros(11))


def test_crop_pad_splits_odd_differences_like_torchio():
    # torchio's example: differences (4, 0, 7) split as (2, 2), (0, 0), (4, 3).
    pad = CropPad.between((6, 5, 3), (10, 5, 10))
    assert (pad.pad_before, pad.pad_after) == ((2, 0, 4), (2, 0, 3))
    assert pad.crop_before == pad.crop_after == (0, 0, 0)
    crop = CropPad.between((10, 5, 10), (6, 5, 3))
    assert (crop.crop_before, crop.crop_after) == ((2, 0, 4), (2, 0, 3))
    assert crop.pad_before == crop.pad_after == (0, 0, 0)


def test_crop_pad_apply_and_invert_round_trip():
    rng = np.random.default_rng(2)
    source = rng.random((5, 8, 4)).astype(np.float32) + 1  # no zeros, so padding shows
    cp = CropPad.between(source.shape, (8, 5, 4))  # pad axis 0 by 3, crop axis 1 by 3
    out = cp.apply(source)
    assert out.shape == (8, 5, 4) and out.dtype == np.float32
    expected = np.zeros((8, 5, 4), np.float32)
    expected[2:7] = source[:, 2:7]
    np.testing.assert_array_equal(out, expected)
    back = cp.invert(out, fill=-1)
    assert back.shape == source.shape
    np.testing.assert_array_equal(back[:, 2:7], source[:, 2:7])
    assert np.all(back[:, [0, 1, 7]] == -1)
    # target -> source -> target keeps everything that was not padding.
    np.testing.assert_array_equal(cp.apply(cp.invert(out)), out)
    with pytest.raises(ValueError, match="expected shape"):
        cp.apply(out)


def test_crop_pad_target_affine_keeps_world_positions():
    cp = CropPad.between((7, 20, 9), (10, 15, 9))
    target_affine = cp.target_affine(AFFINE)
    for t in [(0, 0, 0), (5, 7, 3), (9, 14, 8)]:
        s = np.array(t) - np.array(cp.pad_before) + np.array(cp.crop_before)
        np.testing.assert_allclose(
            target_affine @ np.array([*t, 1.0]), AFFINE @ np.array([*s, 1.0]), atol=1e-12
        )
    np.testing.assert_array_equal(target_affine[:3, :3], AFFINE[:3, :3])


def test_rescale_intensity_hand_computed():
    image = np.arange(101, dtype=np.float32).reshape(101, 1, 1)
    mask = np.zeros_like(image)
    mask[50:] = 0.5  # fractional values count as inside (mask > 0)
    # In-mask values 50..100: p1 = 50.5, p99 = 99.5 -> clip, then (x - 50.5) / 49.
    out = rescale_intensity(image, mask)
    expected = (np.clip(np.arange(101), 50.5, 99.5) - 50.5) / 49
    np.testing.assert_allclose(out.reshape(-1), expected, rtol=1e-6)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert image[0, 0, 0] == 0 and image[-1, 0, 0] == 100  # input untouched


def test_rescale_intensity_errors():
    image = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    with pytest.raises(DataError, match="no voxel > 0") as info:
        rescale_intensity(image, np.zeros_like(image), source="scan.nii.gz")
    assert info.value.path == "scan.nii.gz"
    with pytest.raises(DataError, match="all values"):
        rescale_intensity(np.full((2, 2, 2), 3.0), np.ones((2, 2, 2)))


def _write_case(folder, shape=(30, 34, 14), affine=None, with_seg=True, seed=0):
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    image, mask = _phantom(shape, seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": folder / "img.nii.gz", "mask": folder / "mask.nii.gz", "seg": None}
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), paths["image"])
    nib.save(nib.Nifti1Image(mask, affine), paths["mask"])
    if with_seg:
        seg = np.zeros(shape, np.float32)
        seg[12:16, 14:18, 5:9] = 0.4  # linearly warped label: fractional, binarised with > 0
        seg[13, 15, 6] = 2
        paths["seg"] = folder / "seg.nii.gz"
        nib.save(nib.Nifti1Image(seg, affine), paths["seg"])
    return paths


def test_load_subject_follows_the_reference_order(tmp_path):
    paths = _write_case(tmp_path / "case")
    subject = load_subject(
        paths["image"],
        paths["mask"],
        paths["seg"],
        modality="t2",
        subject_id="case1",
        target_shape=(32, 32, 12),
    )
    # Same steps written out: flow -> Nyúl on the uncropped volume -> crop/pad -> rescale.
    image = read_volume(paths["image"], kind="image")
    mask = read_volume(paths["mask"], kind="mask").data
    cp = CropPad.between(image.shape, (32, 32, 12))
    nyul = histogram_standardize(curvature_flow(image.data, image.spacing), NYUL_LANDMARKS["t2"])
    expected = rescale_intensity(cp.apply(nyul), cp.apply(mask))
    np.testing.assert_array_equal(subject.image, expected)
    # Nyúl after cropping would differ: the order matters.
    late = histogram_standardize(
        cp.apply(curvature_flow(image.data, image.spacing)), NYUL_LANDMARKS["t2"]
    )
    assert not np.allclose(rescale_intensity(late, cp.apply(mask)), expected)

    assert subject.image.shape == subject.mask.shape == subject.seg.shape == (32, 32, 12)
    assert subject.image.dtype == np.float32 and subject.seg.dtype == np.uint8
    assert subject.image.min() == 0 and subject.image.max() == 1
    np.testing.assert_array_equal(subject.mask, cp.apply(mask))
    assert 0 < subject.mask[subject.mask > 0].min() < 1  # fractional rim kept
    assert set(np.unique(subject.seg)) == {0, 1}
    assert subject.seg.sum() == 4 * 4 * 4
    assert subject.subject_id == "case1" and subject.source_shape == (30, 34, 14)
    assert subject.crop_pad == cp
    np.testing.assert_allclose(subject.affine, cp.target_affine(image.affine))
    # Background far from the brain is exactly 0 (padding and clipped background).
    assert np.all(subject.image[0] == 0) and np.all(subject.image[:, :, 0] == 0)


def test_load_subject_without_seg_and_t1(tmp_path):
    paths = _write_case(tmp_path / "case", with_seg=False)
    subject = load_subject(
        paths["image"],
        paths["mask"],
        None,
        modality="T1",
        subject_id="x",
        target_shape=(32, 32, 12),
    )
    assert subject.seg is None
    assert 0 <= subject.image.min() and subject.image.max() <= 1


def test_load_subject_errors(tmp_path):
    paths = _write_case(tmp_path / "case")
    with pytest.raises(ConfigError, match="modality"):
        load_subject(paths["image"], paths["mask"], None, modality="flair", subject_id="x")
    with pytest.raises(ConfigError, match="target_shape"):
        load_subject(
            paths["image"], paths["mask"], None, modality="t2", subject_id="x", target_shape=(8, 8)
        )
    other = _write_case(tmp_path / "other", affine=np.diag([1.0, 1.0, 1.0, 1.0]) + 0.0, seed=1)
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    nib.save(nib.Nifti1Image(read_volume(other["mask"], kind="mask").data, shifted), other["mask"])
    with pytest.raises(DataError, match="affine differs"):
        load_subject(paths["image"], other["mask"], None, modality="t2", subject_id="x")
    small = tmp_path / "small_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), small)
    with pytest.raises(DataError, match="shape"):
        load_subject(paths["image"], small, None, modality="t2", subject_id="x")
    native = _write_case(tmp_path / "native", affine=AFFINE)
    with pytest.raises(DataError, match="data_prep") as info:
        load_subject(native["image"], native["mask"], None, modality="t2", subject_id="x")
    assert info.value.path == str(native["image"])
    subject = load_subject(
        native["image"],
        native["mask"],
        None,
        modality="t2",
        subject_id="x",
        target_shape=(32, 32, 12),
        expected_spacing=None,
    )
    assert subject.image.shape == (32, 32, 12)


def test_load_subject_reorients_to_the_training_axes_and_maps_back(tmp_path):
    # AFFINE stores the axes as L, A, S (spacing 1.2, 0.9, 2.0); the training axes here are S, P, R.
    paths = _write_case(tmp_path / "case", affine=AFFINE)
    stored_mask = read_volume(paths["mask"], kind="mask").data
    kwargs = dict(modality="t2", subject_id="x", expected_spacing=None, orientation=("S", "P", "R"))
    # No crop/pad (the reoriented shape), so mapping back must give the stored voxels exactly.
    subject = load_subject(
        paths["image"], paths["mask"], paths["seg"], target_shape=(14, 34, 30),
        spacing=(2.0, 0.9, 1.2), **kwargs,
    )  # fmt: skip
    assert subject.reorientation.target_axcodes == ("S", "P", "R")
    assert subject.source_shape == (30, 34, 14)
    np.testing.assert_allclose(subject.source_affine, AFFINE, atol=1e-6)
    np.testing.assert_array_equal(subject.mask, stored_mask.transpose(2, 1, 0)[:, ::-1, ::-1])
    np.testing.assert_array_equal(subject.to_source(subject.mask), stored_mask)
    # The per-axis spacing is checked after reorientation, along the training axes.
    with pytest.raises(DataError, match="along the training axes") as info:
        load_subject(paths["image"], paths["mask"], None, target_shape=(14, 34, 30),
                     spacing=(1.2, 0.9, 2.0), **kwargs)  # fmt: skip
    assert info.value.path == str(paths["image"])
