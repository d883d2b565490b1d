"""p2l.heatmaps: reference equivalence, exact region skipping, batching, errors, multi-device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from p2l import heatmaps, postprocess
from p2l.errors import ConfigError, DataError
from p2l.model import Patch2Loc, init_variables
from tests.torch_reference import reference_network

REPO = Path(__file__).resolve().parents[1]
P = 12  # the network is fully convolutional: a small patch keeps the tests fast
BATCH = 64


@pytest.fixture(scope="module")
def model_and_variables():
    model = Patch2Loc()
    # One compilation of init instead of eager op-by-op dispatch.
    variables = jax.jit(lambda key: init_variables(model, key, P))(jax.random.key(0))
    # Non-trivial BatchNorm statistics, so outputs depend on the input (set, not computed:
    # a train-mode forward would cost one more compilation).
    rng = np.random.default_rng(1)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            rng.uniform(0.5, 2.0, a.shape) if path[-1].key == "var" else rng.normal(0, 0.3, a.shape)
        ).astype(np.float32),
        variables["batch_stats"],
    )
    return model, {"params": variables["params"], "batch_stats": stats}


def brain_like(h=26, w=22, d=4, seed=0):
    """A volume with an ellipsoid 'brain' and a fractional-border mask, as after registration."""
    rng = np.random.default_rng(seed)
    yy, xx, zz = np.meshgrid(
        np.linspace(-1, 1, h), np.linspace(-1, 1, w), np.linspace(-1, 1, d), indexing="ij"
    )
    r = np.sqrt((yy / 0.7) ** 2 + (xx / 0.6) ** 2 + (zz / 1.5) ** 2)
    mask = np.clip((1.0 - r) * 4, 0, 1).astype(np.float32)
    vol = (rng.random((h, w, d)) * (mask > 0)).astype(np.float32)
    return vol, mask


# --- the reference's upsampling and the skip set -------------------------------------------------


def test_upsampling_matches_embedded_torch_output():
    # torch.nn.functional.interpolate(grid[None, None], size=(6, 9), mode="bilinear",
    # align_corners=True) with torch 2.13.0 (rounded to 6 decimals; no torch needed here).
    grid = np.array([[0, 5, -1, 2], [3, -2, 4, 1], [1, 0, 6, -3]], np.float32)
    want = np.array(
        [
            [0.0, 1.875, 3.75, 4.25, 2.0, -0.25, -0.25, 0.875, 2.0],
            [1.2, 1.575, 1.95, 2.05, 1.6, 1.15, 1.15, 1.375, 1.6],
            [2.4, 1.275, 0.15, -0.15, 1.2, 2.55, 2.55, 1.875, 1.2],
            [2.6, 1.025, -0.55, -0.85, 1.4, 3.65, 3.35, 1.775, 0.2],
            [1.8, 0.825, -0.15, -0.05, 2.2, 4.45, 3.55, 1.075, -1.4],
            [1.0, 0.625, 0.25, 0.75, 3.0, 5.25, 3.75, 0.375, -3.0],
        ],
        np.float32,
    )
    got = heatmaps.upsample_align_corners(grid[None], 6, 9)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Stride 1 (grid == output): the values themselves.
    np.testing.assert_array_equal(heatmaps.upsample_align_corners(grid[None], 3, 4)[0], grid)


def test_grid_points_sit_at_align_corners_positions_not_at_centres():
    # 192 px at stride 4: 48 centres 0, 4, ..., 188, but grid point i lands on output
    # i * 191/47 = 4.064 i (the reference's rule), so the last one lands on pixel 191.
    i0, i1, w0, w1 = heatmaps._bilinear_taps(192, 48)
    assert (i0[191], w1[191]) == (47, 0.0)
    assert i0[188] == 46 and 0.2 < w1[188] < 0.3


@pytest.mark.parametrize("stride", [2, 3, 5])
def test_needed_grid_is_sufficient_and_minimal(stride):
    rng = np.random.default_rng(stride)
    h, w, d = 23, 19, 3
    region = rng.random((h, w, d)) < 0.05
    needed = heatmaps.needed_grid(region, stride)
    assert needed.shape == (d, heatmaps.grid_size(h, stride), heatmaps.grid_size(w, stride))
    assert 0 < needed.sum() < needed.size
    grid = rng.normal(size=needed.shape).astype(np.float32)
    full = heatmaps.upsample_align_corners(grid, h, w).transpose(1, 2, 0)
    # Sufficient: unevaluated points hold the placeholder 0; region voxels do not change at all.
    part = heatmaps.upsample_align_corners(np.where(needed, grid, 0), h, w).transpose(1, 2, 0)
    np.testing.assert_array_equal(full[region], part[region])
    # Minimal: changing any needed point changes some region voxel.
    for z, i, j in zip(*np.nonzero(needed), strict=True):
        bumped = grid.copy()
        bumped[z, i, j] += 1.0
        up = heatmaps.upsample_align_corners(bumped, h, w).transpose(1, 2, 0)
        assert np.any(up[region] != full[region]), (z, i, j)


# --- volumes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,shape", [(1, (26, 22, 4)), (4, (40, 36, 4))])
def test_skipping_gives_the_same_postprocessed_result(model_and_variables, stride, shape):
    """Spec §5.4-5.5 defaults (7-cube median, fractional mask): skipping changes nothing."""
    model, variables = model_and_variables
    vol, mask = brain_like(*shape)
    kw = dict(patch=P, stride=stride, batch_size=BATCH)
    full = heatmaps.volume_heatmap(model, variables, vol, **kw)
    region = postprocess.influence_region(mask, 7)
    skipped = heatmaps.volume_heatmap(model, variables, vol, region=region, **kw)
    assert skipped.patches_evaluated < full.patches_evaluated
    a = postprocess.postprocess(full.score, mask, median_size=7)
    b = postprocess.postprocess(skipped.score, mask, median_size=7)
    assert np.count_nonzero(a) > 0.15 * a.size
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(full.error[region], skipped.error[region])
    assert not skipped.score[~region].any()  # documented: 0 outside the region


def test_batches_mix_slices_and_the_padded_last_batch_is_dropped(model_and_variables):
    model, variables = model_and_variables
    vol, _ = brain_like()
    n = vol.size  # stride 1: one patch per voxel
    big = heatmaps.volume_heatmap(model, variables, vol, patch=P, batch_size=BATCH)
    odd = heatmaps.volume_heatmap(model, variables, vol, patch=P, batch_size=37)  # n % 37 != 0
    assert big.patches_evaluated == odd.patches_evaluated == n
    np.testing.assert_allclose(odd.error, big.error, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(odd.logvar, big.logvar, rtol=1e-5, atol=1e-5)


def test_one_voxel_equals_a_single_patch_forward(model_and_variables):
    model, variables = model_and_variables
    vol, _ = brain_like()
    res = heatmaps.volume_heatmap(model, variables, vol, patch=P, batch_size=BATCH, num_slices=8)
    padded = np.pad(vol, ((P // 2, P // 2), (P // 2, P // 2), (0, 0)))
    h, w, _ = vol.shape
    apply = jax.jit(model.apply)  # one compilation for the three single-patch forwards
    for y, x, z in [(0, 0, 0), (13, 5, 3), (h - 1, w - 1, 1)]:
        cut = padded[y : y + P, x : x + P, z][None, :, :, None]
        # num_slices=8: position 100*z/8 (spec §3.1), targets 100*(y/H, x/W) (spec §5.2).
        mean, logvar = apply(variables, cut, np.array([100.0 * z / 8], np.float32))
        err = float(np.sum((np.asarray(mean)[0] - [100.0 * y / h, 100.0 * x / w]) ** 2))
        lv = float(np.mean(np.asarray(logvar)[0]))
        np.testing.assert_allclose(res.error[y, x, z], err, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(res.logvar[y, x, z], lv, rtol=1e-4, atol=1e-4)


def test_variants_and_async_start(model_and_variables):
    model, variables = model_and_variables
    vol, _ = brain_like()
    pending = heatmaps.start_volume_heatmap(
        model, variables, vol, patch=P, batch_size=BATCH, variant="variance"
    )
    var = pending.result()
    assert var.variant == "variance"
    np.testing.assert_array_equal(var.score, var.logvar)
    np.testing.assert_allclose(
        heatmaps.combine(var.error, var.logvar, "combined"),
        np.log(var.error + 1e-10) + var.logvar,
        rtol=1e-6,
    )
    np.testing.assert_allclose(heatmaps.combine(var.error, var.logvar, "error"),
                               np.log(var.error + 1e-10), rtol=1e-6)  # fmt: skip


def test_empty_region_evaluates_nothing(model_and_variables):
    model, variables = model_and_variables
    vol, _ = brain_like()
    res = heatmaps.volume_heatmap(
        model, variables, vol, patch=P, stride=4, batch_size=BATCH, region=np.zeros(vol.shape)
    )
    assert res.patches_evaluated == 0
    assert not res.score.any() and res.score.shape == vol.shape


def test_bad_inputs_raise_clear_errors(model_and_variables):
    model, variables = model_and_variables
    vol, _ = brain_like()
    run = lambda v, **kw: heatmaps.volume_heatmap(  # noqa: E731
        model, variables, v, **{"patch": P, "batch_size": BATCH, "name": "scan.nii.gz", **kw}
    )
    with pytest.raises(DataError, match=r"scan\.nii\.gz.*3-D.*\(26, 22\)"):
        run(vol[..., 0])
    with pytest.raises(DataError, match="3-D"):
        run(vol[..., None])
    bad = vol.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(DataError, match="1 non-finite"):
        run(bad)
    with pytest.raises(DataError, match="region shape"):
        run(vol, region=np.ones((26, 22, 3), bool))
    with pytest.raises(ConfigError, match="eval.stride"):
        run(vol, stride=0)
    with pytest.raises(ConfigError, match="eval.batch_size"):
        run(vol, batch_size=2.5)
    with pytest.raises(ConfigError, match="eval.variant"):
        run(vol, variant="product")
    with pytest.raises(ConfigError, match="eval.dtype"):
        run(vol, dtype="int8")


# --- equivalence with the PyTorch reference ------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return reference_network(P)


@pytest.mark.parametrize("stride,shape", [(1, (14, 12, 2)), (3, (22, 17, 2))])
def test_same_heatmap_as_the_reference_code(reference, stride, shape):
    """Same weights -> the reference harness's volume_heatmap (spec §5.2-5.3) and ours agree."""
    torch, module, net = reference
    from p2l import torch_weights

    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    variables = torch_weights.torch_state_dict_to_variables(state)
    vol = np.random.default_rng(3).random(shape).astype(np.float32)
    h, w, d = shape
    volume = torch.from_numpy(vol.transpose(2, 0, 1).copy())[:, None]  # (D, 1, H, W)
    want, _ = module.volume_heatmap(
        net, volume, P, stride, 256, torch.float32, module.Clock(torch.device("cpu")), 1, d
    )
    got = heatmaps.volume_heatmap(Patch2Loc(), variables, vol, patch=P, stride=stride,
                                  batch_size=BATCH)  # fmt: skip
    want = want.numpy()
    assert got.score.shape == want.shape == shape
    # The score is log(error): compare where the error is not tiny (log amplifies rounding).
    ok = got.error > 1e-2
    assert ok.mean() > 0.9
    np.testing.assert_allclose(got.score[ok], want[ok], rtol=0, atol=2e-3)


# --- sharding over several devices --------------------------------------------------------------

_FOUR_DEVICES = """
import json, jax, numpy as np
from p2l import heatmaps
from p2l.model import Patch2Loc
variables = json.loads(open(0).read())
variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables,
                                   is_leaf=lambda a: isinstance(a, list))
vol = np.random.default_rng(0).random((13, 11, 3)).astype(np.float32)
res = heatmaps.volume_heatmap(Patch2Loc(), variables, vol, patch=12, stride=2, batch_size=8)
print(json.dumps({"devices": jax.local_device_count(), "n": res.patches_evaluated,
                  "score": res.score.ravel().tolist()}))
"""


@pytest.mark.slow  # a subprocess with 4 fake devices compiles the forward again
def test_four_devices_give_the_single_device_heatmap(model_and_variables):
    """The batch is sharded over 4 (fake CPU) devices; same heatmap as on one device."""
    model, variables = model_and_variables
    vol = np.random.default_rng(0).random((13, 11, 3)).astype(np.float32)
    one = heatmaps.volume_heatmap(model, variables, vol, patch=P, stride=2, batch_size=8)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    payload = json.dumps(jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), variables))
    proc = subprocess.run(
        [sys.executable, "-c", _FOUR_DEVICES], input=payload, env=env, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    four = json.loads(proc.stdout.strip().splitlines()[-1])
    assert four["devices"] == 4
    assert four["n"] == one.patches_evaluated == 7 * 6 * 3
    np.testing.assert_allclose(four["score"], one.score.ravel(), rtol=1e-5, atol=1e-5)
