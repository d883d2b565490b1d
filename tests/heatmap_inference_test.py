"""Sliding-window heatmaps: patch order, targets, reference upsampling, provably safe skipping."""

import jax
import numpy as np
import pytest

from p2l import heatmaps, patches, postprocess
from p2l.model import Patch2Loc, init_variables


@pytest.fixture(scope="module")
def model_and_variables():
    model = Patch2Loc()
    variables = init_variables(model, jax.random.key(0), 8)
    # Non-trivial BatchNorm statistics so outputs vary with the input.
    x = jax.random.normal(jax.random.key(1), (64, 8, 8, 1))
    _, upd = model.apply(variables, x, jax.numpy.arange(64.0), train=True, mutable=["batch_stats"])
    return model, {"params": variables["params"], "batch_stats": upd["batch_stats"]}


def volume(h=20, w=18, d=5):
    rng = np.random.default_rng(0)
    return rng.random((h, w, d)).astype(np.float32)


def test_stride_one_equals_per_patch_forward(model_and_variables):
    model, variables = model_and_variables
    vol = volume()
    res = heatmaps.volume_heatmap(model, variables, vol, patch=8, stride=1, batch_size=64)
    assert res.patches_evaluated == 20 * 18 * 5
    # Recompute a few voxels one patch at a time, the reference's way (spec §5.2).
    padded = np.pad(vol, ((4, 4), (4, 4), (0, 0)))
    for y, x, z in [(0, 0, 0), (7, 11, 2), (19, 17, 4)]:
        patch = padded[y : y + 8, x : x + 8, z][None, :, :, None]
        mean, logvar = model.apply(variables, patch, np.array([100.0 * z / 5]))
        target = np.array([100 * y / 20, 100 * x / 18])
        err = float(np.sum((np.asarray(mean)[0] - target) ** 2))
        lv = float(np.mean(np.asarray(logvar)[0]))
        np.testing.assert_allclose(res.error[y, x, z], err, rtol=1e-4)
        np.testing.assert_allclose(res.logvar[y, x, z], lv, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res.score[y, x, z], np.log(err + 1e-10) + lv, rtol=1e-4)


def test_variants():
    e = np.array([1.0, 4.0], np.float32)
    v = np.array([0.5, -1.0], np.float32)
    np.testing.assert_allclose(heatmaps.combine(e, v, "combined"), np.log(e + 1e-10) + v)
    np.testing.assert_allclose(heatmaps.combine(e, v, "error"), np.log(e + 1e-10))
    np.testing.assert_allclose(heatmaps.combine(e, v, "variance"), v)
    with pytest.raises(ValueError, match="variant"):
        heatmaps.combine(e, v, "product")


def test_upsampling_matches_torch_align_corners():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(1).random((3, 5, 4)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(grid)[:, None], size=(17, 15), mode="bilinear", align_corners=True
    )[:, 0].numpy()
    np.testing.assert_allclose(heatmaps.upsample_align_corners(grid, 17, 15), want, atol=1e-6)


def test_upsampling_hand_computed():
    grid = np.array([[[0.0, 3.0]]], np.float32)  # one slice, 1x2 grid -> 1x4 output
    out = heatmaps.upsample_align_corners(grid, 1, 4)
    np.testing.assert_allclose(out[0, 0], [0.0, 1.0, 2.0, 3.0], atol=1e-6)


@pytest.mark.parametrize("stride", [1, 3])
def test_skipping_outside_the_influence_region_changes_nothing(model_and_variables, stride):
    model, variables = model_and_variables
    vol = volume(24, 22, 6)
    mask = np.zeros(vol.shape, np.float32)
    mask[8:14, 9:15, 2:4] = 1.0
    full = heatmaps.volume_heatmap(model, variables, vol, patch=8, stride=stride, batch_size=96)
    region = postprocess.influence_region(mask, 3)
    skipped = heatmaps.volume_heatmap(
        model, variables, vol, patch=8, stride=stride, batch_size=96, region=region
    )
    assert skipped.patches_evaluated < full.patches_evaluated
    a = postprocess.postprocess(full.score, mask, median_size=3)
    b = postprocess.postprocess(skipped.score, mask, median_size=3)
    np.testing.assert_array_equal(a, b)


def test_bfloat16_option_stays_close(model_and_variables):
    model, variables = model_and_variables
    vol = volume(12, 12, 2)
    f32 = heatmaps.volume_heatmap(model, variables, vol, patch=8, batch_size=64)
    bf16 = heatmaps.volume_heatmap(model, variables, vol, patch=8, batch_size=64, dtype="bfloat16")
    assert np.max(np.abs(f32.logvar - bf16.logvar)) < 0.1
    assert np.median(np.abs(f32.score - bf16.score)) < 0.05


def test_grid_is_the_training_geometry():
    ys, xs = patches.sliding_window_centres(10, 7, 3)
    assert list(ys) == [0, 3, 6, 9] and list(xs) == [0, 3, 6]
