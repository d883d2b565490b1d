"""p2l.preparation.steps on synthetic volumes with known geometry: exact orientation, resampling,
cropping, label handling, and recovery of a known rigid motion by the affine registration."""

from __future__ import annotations

import ants
import nibabel as nib
import numpy as np
import pytest

from p2l.preparation.ants_io import write_ants_atomic
from p2l.preparation.atlas import load_atlas
from p2l.preparation.steps import (
    N4Params,
    RegistrationParams,
    affine_summary,
    binarise_labels,
    binarise_warped_seg,
    crop_to_mask,
    n4_correct,
    register_to_atlas,
    remove_transform_files,
    reorient_resample,
    warp_to_atlas,
)
from tests import data_prep_phantom as phantom


def _ants_from(data: np.ndarray, affine: np.ndarray, tmp_path, name="vol.nii.gz"):
    path = phantom.save(tmp_path / name, data, affine)
    return ants.image_read(str(path)), path


def _world_ras(image: ants.ANTsImage) -> np.ndarray:
    """RAS coordinates (shape + (3,)) of every voxel of an ANTs image (ITK works in LPS)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1)
    direction = np.asarray(image.direction) * np.asarray(image.spacing)
    lps = index @ direction.T + np.asarray(image.origin)
    return lps * np.array([-1.0, -1.0, 1.0])


def _linear_field(points_ras: np.ndarray) -> np.ndarray:
    return 100.0 + 2.0 * points_ras[..., 0] - 1.0 * points_ras[..., 1] + 3.0 * points_ras[..., 2]


def test_resample_oblique_anisotropic_to_1mm_rai_keeps_world_positions(tmp_path):
    shape, spacing = (60, 50, 24), (1.3, 0.9, 2.5)
    affine = phantom.grid_affine(shape, spacing, "LAS", rotation_deg=7.0)
    points = phantom.world_points(shape, affine).reshape(shape + (3,))
    image, path = _ants_from(_linear_field(points), affine, tmp_path)

    out, info = reorient_resample(image, "image")

    assert info["resampled"] and info["interpolation"] == "bspline"
    assert np.allclose(out.spacing, 1.0)
    written = tmp_path / "out.nii.gz"
    write_ants_atomic(out, written, "image")
    assert "".join(nib.aff2axcodes(nib.load(written).affine)) == "LPS"  # ITK's RAI
    # A cubic B-spline reproduces a linear field exactly away from the borders, so every interior
    # output voxel must carry the value of its own world position: orientation and resampling
    # geometry are exact.
    world = _world_ras(out)
    expected = _linear_field(world)
    inverse = np.linalg.inv(affine)
    native_index = world.reshape(-1, 3) @ inverse[:3, :3].T + inverse[:3, 3]
    margin = 4
    interior = np.all(
        (native_index > margin) & (native_index < np.array(shape) - 1 - margin), axis=1
    ).reshape(out.shape)
    assert interior.sum() > 10_000
    np.testing.assert_allclose(out.numpy()[interior], expected[interior], atol=0.05)


def test_1mm_scan_is_only_reoriented(tmp_path):
    shape = (20, 22, 18)
    affine = phantom.grid_affine(shape, (1.0, 1.0, 1.0), "RAS")
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    image, _ = _ants_from(data, affine, tmp_path)

    out, info = reorient_resample(image, "image")

    assert not info["resampled"]
    # RAS -> RAI (LPS in nibabel) flips the first two axes; no interpolation happened.
    np.testing.assert_array_equal(out.numpy(), data[::-1, ::-1, :])


def test_mask_resampling_is_linear_then_half_and_keeps_volume(tmp_path):
    shape, spacing = (80, 80, 30), (0.9, 0.9, 3.0)
    affine = phantom.grid_affine(shape, spacing, "LPS")
    points = phantom.world_points(shape, affine).reshape(shape + (3,))
    sphere = (np.linalg.norm(points, axis=-1) <= 25.0).astype(np.float32)
    image, _ = _ants_from(sphere, affine, tmp_path)

    out, info = reorient_resample(image, "mask")

    assert info["interpolation"] == "linear>=0.5"
    assert set(np.unique(out.numpy())) == {0.0, 1.0}
    true_volume = 4 / 3 * np.pi * 25.0**3
    assert out.numpy().sum() == pytest.approx(true_volume, rel=0.03)


@pytest.mark.parametrize("mode, extra", [("reference", 0), ("inclusive", 1)])
def test_crop_to_mask_bounding_box_and_world_positions(mode, extra):
    data = np.zeros((30, 40, 20), np.float32)
    data[5:15, 10:31, 3:9] = 1.0  # non-zero indices 5..14, 10..30, 3..8
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    mask = ants.from_numpy(
        data, origin=(10.0, -20.0, 30.0), spacing=(1.0, 1.0, 1.0), direction=direction
    )
    values = ants.from_numpy(
        np.arange(data.size, dtype=np.float32).reshape(data.shape),
        origin=mask.origin,
        spacing=mask.spacing,
        direction=direction,
    )

    cropped, info = crop_to_mask({"image": values, "mask": mask}, mask, mode)

    # cut.py slices [min:max]: the last non-zero index on every axis is dropped in "reference".
    assert cropped["image"].shape == (9 + extra, 20 + extra, 5 + extra)
    assert info["lower"] == [5, 10, 3]
    # The voxel at the crop's (0, 0, 0) is the original (5, 10, 3), at the same world point.
    original = ants.transform_index_to_physical_point(values, (5, 10, 3))
    moved = ants.transform_index_to_physical_point(cropped["image"], (0, 0, 0))
    np.testing.assert_allclose(moved, original, atol=1e-6)
    assert cropped["image"].numpy()[0, 0, 0] == values.numpy()[5, 10, 3]


def test_binarise_labels_brats_whole_tumour_and_wmh_other_pathology():
    labels = np.zeros((6, 6, 6), np.float32)
    labels[0, 0, :3] = [1, 2, 4]
    labels[1, 1, 1] = 2
    seg = ants.from_numpy(labels)

    whole, info = binarise_labels(seg)
    assert set(np.unique(whole.numpy())) == {0.0, 1.0}
    assert info["lesion_voxels"] == 4
    assert info["label_voxels"] == {"0": 212, "1": 1, "2": 2, "4": 1}

    without_2, info = binarise_labels(seg, background_labels=(2,))
    assert info["lesion_voxels"] == 2 and without_2.numpy()[1, 1, 1] == 0


def _shift_transform(tmp_path, shift_mm):
    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, translation=shift_mm
    )
    path = str(tmp_path / "shift.mat")
    ants.write_transform(transform, path)
    return [path]


def test_seg_warp_reference_rule_adds_one_layer_fraction_keeps_volume(tmp_path):
    grid = ants.from_numpy(np.ones((30, 30, 30), np.float32))
    atlas = type("A", (), {"image": grid})()  # warp_to_atlas only needs the target grid
    cube = np.zeros((30, 30, 30), np.float32)
    cube[10:20, 10:20, 10:20] = 1.0
    transforms = _shift_transform(tmp_path, (0.3, 0.0, 0.0))

    fraction = warp_to_atlas(grid.new_image_like(cube), atlas, transforms)

    assert fraction.numpy().sum() == pytest.approx(1000.0, abs=1e-3)
    assert binarise_warped_seg(fraction).numpy().sum() == 1100  # > 0: one extra layer in x
    assert binarise_warped_seg(fraction, 0.5).numpy().sum() == 1000  # >= 0.5: volume kept
    assert fraction.numpy().max() <= 1.0 and fraction.numpy().min() >= 0.0


def test_n4_removes_a_smooth_multiplicative_bias(tmp_path):
    shape = (70, 80, 64)
    affine = phantom.grid_affine(shape, (2.0, 2.0, 2.0), "LPS")
    points = phantom.world_points(shape, affine)
    clean = phantom.tissue(points).reshape(shape)
    bias = (1.0 + 0.4 * points[:, 0] / 60.0).reshape(shape)
    image, _ = _ants_from((clean * bias).astype(np.float32), affine, tmp_path)
    mask = image.new_image_like((clean > 0).astype(np.float32))
    tissue = clean > 50

    corrected = n4_correct(image, mask, N4Params(iters=(50, 50, 50)))

    def spread(ratio):
        return np.std(ratio) / np.mean(ratio)

    # Image / true tissue is the multiplicative field: 1 + 0.4 x / 60 before, ~constant after.
    before = spread(bias[tissue])
    after = spread(corrected.numpy()[tissue] / clean[tissue])
    assert after < 0.4 * before  # measured: 0.045 vs 0.144 (the texture is partly smooth too)


def test_affine_registration_recovers_a_known_head_motion(tmp_path):
    atlas = load_atlas(phantom.atlas(tmp_path / "atlas.nii.gz"))
    data, labels, affine = phantom.scan(
        (100, 150, 70), (1.2, 1.0, 2.0), "LAS", 8.0, **phantom.MOTION
    )
    image, _ = _ants_from(data, affine, tmp_path, "scan.nii.gz")
    seg, _ = _ants_from(labels.astype(np.float32), affine, tmp_path, "seg.nii.gz")
    resampled, _ = reorient_resample(image)

    warped, transforms = register_to_atlas(
        resampled, atlas, RegistrationParams.with_iterations((100, 50))
    )
    summary = affine_summary(transforms)
    binary, _ = binarise_labels(seg)
    fraction = warp_to_atlas(binary, atlas, transforms)
    remove_transform_files(transforms)

    # ITK maps atlas -> scan points in LPS: the head's rotation about z is the same matrix, the
    # shift (6, -5, 4) RAS is (-6, 5, 4) LPS; the centre of rotation is the world origin.
    angle = np.deg2rad(phantom.MOTION["head_rotation_deg"])
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    matrix = np.asarray(summary["matrix"])
    np.testing.assert_allclose(matrix, rotation, atol=0.02)
    centre = np.asarray(summary["center"])
    offset = np.asarray(summary["translation"]) + centre - matrix @ centre
    np.testing.assert_allclose(offset, [-6.0, 5.0, 4.0], atol=0.5)
    # The lesion lands where the atlas has it, with its volume (a rigid motion: det ~ 1).
    lesion_mm3 = float((labels > 0).sum()) * 1.2 * 1.0 * 2.0
    assert fraction.numpy().sum() == pytest.approx(lesion_mm3, rel=0.05)
    atlas_lesion = phantom.lesion(_world_ras(atlas.image).reshape(-1, 3)).reshape(atlas.image.shape)
    hit = fraction.numpy()[atlas_lesion > 0].sum() / fraction.numpy().sum()
    assert hit > 0.8
    assert warped.shape == atlas.image.shape
