"""Tests of p2l.postprocess: exact median filter, brain masking, influence region, pDDPM options."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from p2l import postprocess
from p2l.errors import ConfigError, DataError


def _brain(shape: tuple[int, int, int]) -> np.ndarray:
    """Ellipsoidal brain mask with fractional border values, like a linearly warped mask."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum((g / 0.7) ** 2 for g in grids))
    return np.clip((1.0 - radius) * 4.0, 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("size", [3, 5, 7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_median_filter_equals_scipy_with_ties(size, dtype):
    rng = np.random.default_rng(size)
    # Few distinct values: many ties inside every window.
    score = rng.integers(-4, 5, size=(23, 19, 17)).astype(dtype)
    expected = ndimage.median_filter(score, size=size, mode="reflect")
    result = postprocess.median_filter(score, size)
    assert result.dtype == score.dtype
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (3, 2, 5), (1, 7, 2), (6, 1, 3), (9,)])
def test_median_filter_equals_scipy_on_axes_shorter_than_the_window(shape):
    # Repeated reflection: numpy's 'symmetric' padding must match scipy's 'reflect'.
    score = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(
        postprocess.median_filter(score, 7), ndimage.median_filter(score, size=7, mode="reflect")
    )


def test_median_filter_hand_computed_reflect_boundary():
    # Axes of length 1 repeat the same value, so each 3x3x3 window holds the three z-neighbours
    # 9 times each; at the ends 'reflect' repeats the edge value: [1|1 5 2 8 3|3].
    score = np.array([1, 5, 2, 8, 3], dtype=np.float32).reshape(1, 1, 5)
    np.testing.assert_array_equal(postprocess.median_filter(score, 3).ravel(), [1, 2, 5, 3, 3])


def test_median_filter_threads_and_blocks_give_the_same_result(monkeypatch):
    score = np.random.default_rng(1).standard_normal((20, 21, 22)).astype(np.float32)
    expected = ndimage.median_filter(score, size=7)
    monkeypatch.setattr(postprocess, "_BLOCK_VOXELS", 97)  # many uneven blocks
    np.testing.assert_array_equal(postprocess.median_filter(score, 7, workers=3), expected)
    np.testing.assert_array_equal(postprocess.median_filter(score, 7, workers=1), expected)


def test_median_filter_where_computes_only_those_voxels():
    rng = np.random.default_rng(2)
    score = rng.standard_normal((18, 16, 14)).astype(np.float32)
    where = rng.random(score.shape) < 0.3
    result = postprocess.median_filter(score, 5, where=where)
    np.testing.assert_array_equal(result[where], ndimage.median_filter(score, size=5)[where])
    assert not result[~where].any()


def test_median_filter_size_one_is_a_copy():
    score = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    result = postprocess.median_filter(score, 1)
    np.testing.assert_array_equal(result, score)
    assert result is not score


@pytest.mark.parametrize("size", [0, 4, -3, 2.0, True])
def test_median_filter_rejects_sizes_without_a_centre(size):
    with pytest.raises(ConfigError, match="median_size"):
        postprocess.median_filter(np.zeros((3, 3, 3), np.float32), size)


def test_median_filter_rejects_nan_it_would_read_and_names_the_volume():
    score = np.zeros((8, 8, 8), np.float32)
    score[4, 4, 4] = np.nan
    with pytest.raises(DataError, match=r"^case-7\.nii\.gz: .*non-finite"):
        postprocess.median_filter(score, 3, name="case-7.nii.gz")
    # A NaN outside every computed window is not read, so it is not an error.
    where = np.zeros(score.shape, bool)
    where[0, 0, 0] = True
    assert postprocess.median_filter(score, 3, where=where)[0, 0, 0] == 0


def test_median_filter_rejects_bad_inputs():
    with pytest.raises(DataError, match="dtype"):
        postprocess.median_filter(np.zeros((3, 3, 3), bool), 3)
    with pytest.raises(DataError, match="where shape"):
        postprocess.median_filter(np.zeros((3, 3, 3)), 3, where=np.ones((3, 3, 2), bool))


def test_postprocess_defaults_are_median_then_raw_mask_product():
    rng = np.random.default_rng(3)
    shape = (24, 22, 20)
    score = rng.normal(2.0, 1.5, size=shape).astype(np.float32)
    mask = _brain(shape)
    assert 0 < np.count_nonzero((mask > 0) & (mask < 1))  # fractional border present
    expected = ndimage.median_filter(score, size=7, mode="reflect") * mask
    result = postprocess.postprocess(score, mask)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, expected)


def test_postprocess_options():
    rng = np.random.default_rng(4)
    shape = (20, 20, 16)
    score = rng.standard_normal(shape).astype(np.float32)
    mask = _brain(shape)
    np.testing.assert_array_equal(
        postprocess.postprocess(score, mask, median_size=None), score * mask
    )
    np.testing.assert_array_equal(postprocess.postprocess(score, mask, median_size=0), score * mask)
    filtered = ndimage.median_filter(score, size=5)
    np.testing.assert_array_equal(
        postprocess.postprocess(score, mask, median_size=5, binarize_mask=True),
        np.where(mask > 0, filtered, 0),
    )
    eroded = ndimage.binary_erosion(mask > 0, iterations=2)
    np.testing.assert_array_equal(
        postprocess.postprocess(score, mask, erode_mask_iterations=2),
        ndimage.median_filter(score, size=7) * np.where(eroded, mask, 0),
    )


def test_postprocess_rejects_mismatched_mask():
    with pytest.raises(DataError, match=r"^vol\.npy: mask shape"):
        postprocess.postprocess(np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), name="vol.npy")


def test_influence_region_is_the_cube_dilation_of_the_mask():
    mask = _brain((30, 28, 26))
    region = postprocess.influence_region(mask, 7)
    expected = ndimage.binary_dilation(mask > 0, structure=np.ones((7, 7, 7), bool))
    np.testing.assert_array_equal(region, expected)
    np.testing.assert_array_equal(postprocess.influence_region(mask, None), mask > 0)
    np.testing.assert_array_equal(postprocess.influence_region(mask, 1), mask > 0)


@pytest.mark.parametrize("median_size", [7, 5, None])
def test_scores_outside_the_influence_region_do_not_change_postprocess(median_size):
    rng = np.random.default_rng(5)
    shape = (30, 28, 26)
    mask = _brain(shape)
    score = rng.normal(1.0, 2.0, size=shape).astype(np.float32)
    region = postprocess.influence_region(mask, median_size)
    assert 0 < region.sum() < region.size
    changed = score.copy()
    outside = ~region
    changed[outside] = rng.choice(
        np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0], np.float32), size=outside.sum()
    )
    np.testing.assert_array_equal(
        postprocess.postprocess(changed, mask, median_size=median_size),
        postprocess.postprocess(score, mask, median_size=median_size),
    )


def test_apply_brain_mask_fractional_binarized_and_nonfinite_background():
    score = np.array([[[2.0, -3.0, np.nan, 4.0]]], np.float32)
    mask = np.array([[[1.0, 0.5, 0.0, 0.25]]], np.float32)
    np.testing.assert_array_equal(
        postprocess.apply_brain_mask(score, mask).ravel(), [2.0, -1.5, 0.0, 1.0]
    )
    np.testing.assert_array_equal(
        postprocess.apply_brain_mask(score, mask, binarize=True).ravel(), [2.0, -3.0, 0.0, 4.0]
    )


def test_erode_brain_mask_3d_and_axial_only():
    mask = np.zeros((9, 9, 9), bool)
    mask[2:7, 2:7, 2:7] = True
    eroded = postprocess.erode_brain_mask(mask, 1)
    expected = np.zeros_like(mask)
    expected[3:6, 3:6, 3:6] = True
    np.testing.assert_array_equal(eroded, expected)
    axial = postprocess.erode_brain_mask(mask, 1, axial_only=True)
    expected_axial = np.zeros_like(mask)
    expected_axial[3:6, 3:6, 2:7] = True
    np.testing.assert_array_equal(axial, expected_axial)
    np.testing.assert_array_equal(postprocess.erode_brain_mask(mask, 0), mask)
    with pytest.raises(ConfigError, match="erode_mask_iterations"):
        postprocess.erode_brain_mask(mask, -1)


def test_remove_small_components_counts_26_connected_voxels():
    binary = np.zeros((12, 12, 12), bool)
    binary[1, 1, 1] = True  # 1 voxel
    for i in range(7):  # 7 voxels touching only along the cube diagonal
        binary[3 + i % 2, 3 + i % 2, 1 + i] = True
    binary[7:9, 7:9, 7:9] = True  # 8 voxels
    kept = postprocess.remove_small_components(binary, 7)
    expected = np.zeros_like(binary)
    expected[7:9, 7:9, 7:9] = True
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(postprocess.remove_small_components(binary, 0), binary)
    without_single = binary.copy()
    without_single[1, 1, 1] = False
    np.testing.assert_array_equal(postprocess.remove_small_components(binary, 6), without_single)
    with pytest.raises(ConfigError, match="min_component_voxels"):
        postprocess.remove_small_components(binary, -2)
