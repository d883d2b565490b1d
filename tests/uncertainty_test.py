"""p2l.uncertainty and p2l.patch_outputs: hand-computed statistics, the non-overlapping patch grid,
the bounded seeded reservoir, and the whole report on a tiny random model."""

import json
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from p2l import patch_outputs, patches, uncertainty
from p2l.patch_outputs import VolumeOutputs


def outputs(err, logvar, lesion=None, target=None, subject_id="v"):
    """VolumeOutputs with mean = target + err (float64, so hand values stay exact)."""
    err = np.asarray(err, np.float64).reshape(-1, 2)
    n = len(err)
    target = np.full((n, 2), 50.0) if target is None else np.asarray(target, np.float64)
    lesion = None if lesion is None else np.asarray(lesion, np.float64)
    return VolumeOutputs(subject_id=subject_id, mean=target + err,
                         logvar=np.broadcast_to(np.asarray(logvar, np.float64), (n, 2)),
                         target=target, brain_fraction=np.ones(n), lesion_fraction=lesion,
                         slice_index=np.zeros(n, np.int32), centre=np.zeros((n, 2), np.int32),
                         grid_patches=n)  # fmt: skip


# --- calibration --------------------------------------------------------------------------------


def test_coverage_nll_logvar_and_rms_hand_computed():
    # sigma = 1 (s = 0); |errors| 0.5, 1, 2, 3 on y; 0.1 on x.
    err = np.array([[0.5, 0.1], [1.0, -0.1], [-2.0, 0.1], [3.0, 0.1]])
    cal = uncertainty.Calibration()
    cal.add(outputs(err, 0.0))
    res = cal.result()
    cov = res["coverage"]
    # y: |e| <= 0.6745 -> 1 of 4; <= 1.6449 -> 2; <= 1.96 -> 2. x: all inside.
    assert cov["0.5"]["observed"] == {"y": 0.25, "x": 1.0}
    assert cov["0.9"]["observed"] == {"y": 0.5, "x": 1.0}
    assert cov["0.95"]["observed"] == {"y": 0.5, "x": 1.0}
    assert (cov["0.5"]["nominal"], cov["0.95"]["z"]) == (0.5, 1.96)
    # NLL_y = 0.5 (log 2 pi + mean e^2) = 0.5 (1.8378771 + 3.5625) = 2.7001885
    assert res["nll"]["y"] == pytest.approx(2.7001885, abs=1e-6)
    assert res["nll"]["x"] == pytest.approx(0.5 * (1.8378771 + 0.01), abs=1e-6)
    assert res["mean_logvar"] == {"y": 0.0, "x": 0.0}
    assert res["rms_error"]["y"] == pytest.approx(math.sqrt(3.5625))
    assert (res["patches_seen"], res["patches_kept"], res["volumes"]) == (4, 4, 1)
    # s = log 4, e = 2: 0.5 (log 2 pi + s + e^2 e^-s) = 0.5 (1.8378771 + 1.3862944 + 1)
    cal = uncertainty.Calibration()
    cal.add(outputs([[2.0, 2.0]], math.log(4.0)))
    assert cal.result()["nll"]["y"] == pytest.approx(2.1120857, abs=1e-6)


def gaussian_outputs(n, shift, seed):
    """Errors drawn from N(0, exp(s_true)); the model reports s_true + shift."""
    rng = np.random.default_rng(seed)
    s_true = rng.uniform(-2.0, 4.0, (n, 2))
    err = rng.normal(size=(n, 2)) * np.exp(0.5 * s_true)
    return outputs(err, s_true + shift)


def test_calibrated_gaussian_covers_nominal_and_lies_on_the_diagonal():
    cal = uncertainty.Calibration(max_patches=50_000, seed=0)
    for k in range(4):  # streamed over "volumes"; the reservoir holds half of the patches
        cal.add(gaussian_outputs(25_000, 0.0, k))
    res = cal.result()
    assert (res["patches_seen"], res["patches_kept"]) == (100_000, 50_000)
    for level, cov in res["coverage"].items():
        for c in ("y", "x"):
            assert cov["observed"][c] == pytest.approx(float(level), abs=0.01)
    rel = res["reliability"]
    assert rel["bins"] == 10 and sum(rel["count"]) == 100_000  # y and x pooled
    ratio = np.array(rel["observed_mse"]) / np.array(rel["predicted_variance"])
    np.testing.assert_allclose(ratio, 1.0, atol=0.1)
    assert rel["mean_abs_log_ratio"] < 0.05
    # The Gaussian NLL of a calibrated model: E[0.5 (log 2 pi + s + z^2)] = 0.5 (1.838 + 1 + 1)
    assert res["nll"]["y"] == pytest.approx(0.5 * (1.8378771 + 1.0 + 1.0), abs=0.03)


def test_overconfident_model_under_covers_and_sits_above_the_diagonal():
    cal = uncertainty.Calibration()
    cal.add(gaussian_outputs(40_000, -2.0, 1))  # reports variances e^2 = 7.4x too small
    res = cal.result()
    # Nominal 50 %: P(|Z| <= 0.6745 e^-1) = 0.196.
    assert res["coverage"]["0.5"]["observed"]["y"] == pytest.approx(0.196, abs=0.01)
    for level, cov in res["coverage"].items():
        assert cov["observed"]["x"] < float(level) - 0.2
    ratio = np.array(res["reliability"]["observed_mse"]) / res["reliability"]["predicted_variance"]
    np.testing.assert_allclose(ratio, math.exp(2.0), rtol=0.15)


def test_non_finite_patches_are_counted_and_left_out():
    cal = uncertainty.Calibration()
    cal.add(
        outputs([[0.5, 0.1], [np.inf, 0.0], [1.0, 0.1]], [[0.0, 0.0], [0.0, 0.0], [0.0, np.nan]])
    )
    res = cal.result()
    assert (res["patches_seen"], res["nonfinite_patches"]) == (1, 2)
    assert res["coverage"]["0.5"]["observed"] == {"y": 1.0, "x": 1.0}
    an = uncertainty.LesionAnalysis()
    an.add(outputs([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [np.inf, 0.0]], [0.0, 1.0]))
    assert (an.result()["normal_patches"], an.result()["abnormal_patches"]) == (1, 0)


def test_no_healthy_patch_gives_nulls_not_errors(tmp_path):
    res = uncertainty.Calibration().result()
    assert res["patches_seen"] == 0 and math.isnan(res["nll"]["y"])
    empty = uncertainty.LesionAnalysis().result()
    assert empty["spearman"]["logerror"] == {"rho": None, "p": None}
    payload = uncertainty.write_report({"healthy": res, "lesion_sets": {"E": empty}}, tmp_path)
    assert payload["healthy"]["nll"]["y"] is None
    assert payload["lesion_sets"]["E"]["kl"]["2d"] is None
    for name in ("calibration.png", "e_patch_kde.png"):
        assert (tmp_path / name).stat().st_size > 0


# --- lesion analysis ----------------------------------------------------------------------------


def test_gaussian_kl_closed_form():
    # KL(N(1, 4) || N(0, 1)) = 0.5 (4 + 1 - 1 + ln(1/4)) = 1.3068528
    assert uncertainty.gaussian_kl(1.0, 4.0, 0.0, 1.0) == pytest.approx(1.3068528, abs=1e-7)
    assert uncertainty.gaussian_kl(0.0, 1.0, 1.0, 4.0) == pytest.approx(0.5 * (0.25 + 0.25 - 1
                                                                        + math.log(4)))  # fmt: skip
    # Independent coordinates: the 2-D KL is the sum of the 1-D ones.
    two = uncertainty.gaussian_kl([1, 2], np.diag([4.0, 0.5]), [0, 0], np.diag([1.0, 2.0]))
    one = uncertainty.gaussian_kl(1, 4.0, 0, 1.0) + uncertainty.gaussian_kl(2, 0.5, 0, 2.0)
    assert two == pytest.approx(one)
    assert uncertainty.gaussian_kl([0, 0], np.eye(2), [0, 0], np.eye(2)) == 0.0
    assert math.isnan(uncertainty.gaussian_kl([0, 0], np.ones((2, 2)), [0, 0], np.eye(2)))


def test_streaming_moments_equal_numpy():
    x = np.random.default_rng(0).normal(3.0, 2.0, (1001, 2)) @ np.array([[1, 0.5], [0, 1]])
    m = uncertainty.Moments(2)
    for part in np.array_split(x, [1, 7, 500]):
        m.add(part)
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.cov(), np.cov(x.T), rtol=1e-10)


def error_for(logerror):
    """A (y, x) error whose logerror = log(||e||^2 + 0.5) is the given value."""
    return np.stack([np.sqrt(np.exp(logerror) - 0.5), np.zeros_like(logerror)], axis=1)


def test_spearman_hand_computed_and_classes():
    # Lesion fractions rank 1..5, logerror ranks 2 1 4 3 5: d^2 = 4, rho = 1 - 6*4/(5*24) = 0.8
    lesion = np.array([0.0, 0.05, 0.5, 0.95, 1.0])
    logerror = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    logvar = np.array([-1.5, -2.0, -3.0, -4.5, -5.0])  # falls with lesion: rho -1
    an = uncertainty.LesionAnalysis()
    an.add(outputs(error_for(logerror), logvar[:, None], lesion))
    res = an.result()
    sp = res["spearman"]
    assert sp["logerror"]["rho"] == pytest.approx(0.8)
    assert sp["logerror"]["p"] == pytest.approx(
        stats.spearmanr(lesion, logerror, alternative="greater").pvalue
    )
    assert sp["logvar"]["rho"] == pytest.approx(-1.0) and sp["logvar"]["p"] > 0.9
    # combined = logerror + logvar = 0.5, -1, 1, -1.5, 0: ranks 4 2 5 1 3
    assert sp["combined"]["rho"] == pytest.approx(
        stats.spearmanr(lesion, logerror + logvar).statistic
    )
    assert (res["normal_patches"], res["abnormal_patches"]) == (2, 2)  # < 0.1, > 0.9
    assert res["kl"]["direction"] == "KL(abnormal || normal)"


def test_kl_of_the_accumulator_is_that_of_the_gaussian_fits():
    rng = np.random.default_rng(3)
    an = uncertainty.LesionAnalysis(max_patches=100, seed=1)
    fits = {}
    for cls, lesion, centre in (("normal", 0.0, (1.0, -1.0)), ("abnormal", 1.0, (3.0, 0.5))):
        pts = rng.normal(centre, (0.3, 0.6), (400, 2))
        pts[:, 1] += 0.5 * pts[:, 0]  # correlated
        fits[cls] = (pts.mean(0), np.cov(pts.T))
        for part in np.array_split(pts, 3):  # three volumes
            an.add(outputs(error_for(part[:, 0]), part[:, 1:2], np.full(len(part), lesion)))
    an.add(outputs(np.zeros((5, 2)), 0.0, np.full(5, 0.5)))  # neither class
    an.add(outputs(np.zeros((5, 2)), 0.0, None))  # no seg: skipped
    res = an.result()
    assert (res["patches_seen"], res["patches_kept"], res["volumes"]) == (805, 100, 7)
    assert res["volumes_without_seg"] == 1
    assert (res["normal_patches"], res["abnormal_patches"]) == (400, 400)
    (ma, sa), (mn, sn) = fits["abnormal"], fits["normal"]
    np.testing.assert_allclose(res["gaussian_fits"]["abnormal"]["cov"], sa, rtol=1e-6)
    assert res["kl"]["2d"] == pytest.approx(uncertainty.gaussian_kl(ma, sa, mn, sn), rel=1e-6)
    assert res["kl_reverse"]["2d"] == pytest.approx(uncertainty.gaussian_kl(mn, sn, ma, sa), 1e-6)
    assert res["kl"]["logvar"] == pytest.approx(
        uncertainty.gaussian_kl(ma[1], sa[1, 1], mn[1], sn[1, 1]), rel=1e-6
    )
    one = np.ones(2)
    assert res["kl"]["combined"] == pytest.approx(
        uncertainty.gaussian_kl(ma.sum(), one @ sa @ one, mn.sum(), one @ sn @ one), rel=1e-6
    )


# --- reservoir ----------------------------------------------------------------------------------


def test_reservoir_is_bounded_seeded_and_uniform():
    def fill(seed, batch=700):
        r = uncertainty.Reservoir(columns=1, capacity=1000, seed=seed)
        for start in range(0, 20_000, batch):
            r.add(np.arange(start, min(start + batch, 20_000))[:, None])
        return r

    r = fill(0)
    assert (r.seen, len(r)) == (20_000, 1000)
    assert r._rows.nbytes == 1000 * 8  # fixed at creation, whatever the stream's length
    ids = r.rows()[:, 0]
    assert len(np.unique(ids)) == 1000  # a sample without replacement
    np.testing.assert_array_equal(ids, fill(0).rows()[:, 0])
    assert not np.array_equal(ids, fill(1).rows()[:, 0])
    # Uniform over the stream: each quarter holds ~250 (sd ~14).
    counts = np.bincount((ids // 5000).astype(int), minlength=4)
    assert np.all(np.abs(counts - 250) < 70), counts
    small = uncertainty.Reservoir(2, capacity=10)
    small.add(np.ones((3, 2)))
    assert (small.seen, small.rows().shape) == (3, (3, 2))


# --- the non-overlapping grid -------------------------------------------------------------------


def test_grid_keeps_exactly_the_patches_with_20_percent_brain():
    # P = 5 (half 2): centres 0, 5, 10; the patch at c covers rows/cols c-2 .. c+2.
    h, w, d, p = 12, 11, 2, 5
    mask = np.zeros((h, w, d), np.float32)
    mask[3:8, 3:8, 0] = 1.0  # patch (z0, 5, 5): 25/25
    mask[0, 8:11, 0] = mask[1, 8:10, 0] = 1.0  # patch (z0, 0, 10): 5/25 = exactly 20 %: kept
    mask[8:12, 8, 1] = 1.0  # patch (z1, 10, 10): 4/25 = 16 %: rejected ...
    mask[8:12, 9, 1] = 0.999  # ... fractional mask values do not count (spec §8.10)
    mask[8:11, 0:2, 1] = 1.0  # patch (z1, 10, 0): 6/25 = 24 %: kept
    seg = np.zeros((h, w, d), np.uint8)
    seg[3:5, 3:8, 0] = 2  # any label > 0 is lesion: 10/25 of patch (z0, 5, 5)
    centres, brain, lesion, grid = patch_outputs.kept_patches(mask, seg, p, 0.2)
    assert grid == 3 * 3 * d
    assert centres.tolist() == [[0, 0, 10], [0, 5, 5], [1, 10, 0]]
    np.testing.assert_allclose(brain, [0.2, 1.0, 0.24], rtol=1e-6)
    np.testing.assert_allclose(lesion, [0.0, 0.4, 0.0], rtol=1e-6)
    assert patch_outputs.kept_patches(mask, None, p, 0.2)[2] is None


@pytest.mark.parametrize("shape,p", [((23, 19, 3), 4), ((20, 20, 2), 5)])
def test_grid_fractions_follow_training_windows(shape, p):
    """The brain fraction of each grid patch is the one training's rejection sees (p2l.patches:
    zero padding by P//2, padded[y:y+P, x:x+P], counted in float32)."""
    mask = (np.random.default_rng(p).random(shape) < 0.3).astype(np.float32)
    ys, xs = patches.sliding_window_centres(shape[0], shape[1], p)
    z, y, x = (a.ravel() for a in np.meshgrid(np.arange(shape[2]), ys, xs, indexing="ij"))
    padded = patches.pad_slices(jnp.asarray(mask.transpose(2, 0, 1) == 1), p)
    windows = patches.extract_patches(padded, z, y, x, p)
    counts = np.asarray(jnp.sum(windows.astype(jnp.int32), axis=(1, 2)))
    # IEEE float32 division, as the reference's torch mean (XLA:CPU may multiply by 1/P^2,
    # one ulp off; it only matters at exact ties such as 5/25 = 0.2, kept here).
    want = counts.astype(np.float32) / np.float32(p * p)
    got = patch_outputs.grid_fractions(mask == 1, p)
    np.testing.assert_array_equal(got.ravel(), want)
    centres, brain, _, _ = patch_outputs.kept_patches(mask, None, p, 0.2)
    keep = want >= np.float32(0.2)
    np.testing.assert_array_equal(centres, np.stack([z, y, x], 1)[keep])


# --- the model's outputs and the whole report ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from p2l.config_file import load_config
    from p2l.model import create_model, init_variables

    config = load_config("experiments/demo.py:tiny")
    config.unlock()
    config.data.image_shape = (32, 32, 4)  # patch int(0.125 * 32) = 4
    config.eval.batch_size = 64  # every volume below keeps >= 64 patches: one compilation
    model = create_model(config)
    # The variables' shapes without compiling init (~10 s on CPU): He-normal kernels, zero
    # biases, identity BatchNorm. The values only need to be those of some network.
    shapes = jax.eval_shape(lambda key: init_variables(model, key, 4), jax.random.key(0))
    rng = np.random.default_rng(0)

    def value(path, leaf):
        if path[-1].key == "kernel":
            std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
            return rng.normal(0.0, std, leaf.shape).astype(np.float32)
        return (np.ones if path[-1].key in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

    return config, model, jax.tree_util.tree_map_with_path(value, shapes)


def volume(seed, lesion=False):
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    brain = ((yy / 0.8) ** 2 + (xx / 0.7) ** 2 <= 1.0).astype(np.float32)
    mask = np.repeat(brain[:, :, None], 4, axis=2)
    image = (rng.random((32, 32, 4)) * mask).astype(np.float32)
    seg = None
    if lesion:
        seg = np.zeros((32, 32, 4), np.uint8)
        seg[10:18, 10:18] = 1  # 2 x 2 patches of P = 4 fully inside: abnormal
        image[seg > 0] += 1.0
    return SimpleNamespace(subject_id=f"s{seed}", image=image, mask=mask, seg=seg)


def test_outputs_are_the_model_on_training_patches(tiny):
    config, model, variables = tiny
    vol = volume(0, lesion=True)
    predictor = patch_outputs.GridPredictor.from_config(config, model, variables)
    out = predictor(vol.subject_id, vol.image, vol.mask, vol.seg)
    assert predictor.patch == 4 and len(out) >= 64 and out.grid_patches == 8 * 8 * 4
    z, y, x = out.slice_index, out.centre[:, 0], out.centre[:, 1]
    # Targets and positions as training (spec §3.2): 100*(y/H, x/W), 100*z/D.
    np.testing.assert_allclose(out.target, 100.0 * np.stack([y / 32, x / 32], 1), rtol=1e-6)
    padded = np.pad(vol.image, ((2, 2), (2, 2), (0, 0)))
    pick = [0, len(out) // 2, len(out) - 1]
    cut = np.stack([padded[y[i] : y[i] + 4, x[i] : x[i] + 4, z[i]] for i in pick])[..., None]
    mean, logvar = jax.jit(model.apply)(variables, cut, (100.0 * z[pick] / 4).astype(np.float32))
    np.testing.assert_allclose(out.mean[pick], mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.logvar[pick], logvar, rtol=1e-4, atol=1e-4)
    assert out.lesion_fraction.max() == 1.0 and np.all(out.brain_fraction >= 0.2)


class RecordingWriter:
    def __init__(self):
        self.scalars, self.images, self.flushed = {}, {}, False

    def write_scalars(self, step, scalars):
        self.scalars.update(scalars)

    def write_images(self, step, images):
        self.images.update(images)

    def flush(self):
        self.flushed = True


def test_run_writes_the_json_the_figures_and_tensorboard(tiny, tmp_path):
    config, model, variables = tiny
    writer = RecordingWriter()
    healthy = (volume(s) for s in (1, 2))  # streamed: any iterable
    lesion = {"Synth": [volume(3, lesion=True), volume(4, lesion=True)]}
    payload = uncertainty.run(config, model, variables, healthy, lesion, tmp_path, writer, step=7,
                              max_patches=150, seed=0)  # fmt: skip
    on_disk = json.loads((tmp_path / "uncertainty.json").read_text())
    assert on_disk == json.loads(json.dumps(payload))
    assert on_disk["grid"] == {"patch": 4, "stride": 4, "rejection_rate": 0.2,
                               "dtype": "float32", "rejection_counts": "mask == 1"}  # fmt: skip
    h = on_disk["healthy"]
    assert h["volumes"] == 2 and h["patches_seen"] > 150 and h["patches_kept"] == 150
    assert set(h["coverage"]) == {"0.5", "0.9", "0.95"}
    s = on_disk["lesion_sets"]["Synth"]
    assert s["volumes"] == 2 and s["abnormal_patches"] == 2 * 4 * 4 and s["normal_patches"] > 0
    assert "plot_data" not in s and s["kl"]["direction"] == "KL(abnormal || normal)"
    for name in ("calibration.png", "synth_patch_kde.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert writer.flushed
    assert "uncertainty/healthy/coverage50_y" in writer.scalars
    assert "uncertainty/Synth/spearman_logerror" in writer.scalars
    assert all(math.isfinite(v) for v in writer.scalars.values())
    img = writer.images["uncertainty/Synth/patch_kde"]
    assert img.dtype == np.uint8 and img.ndim == 4 and img.shape[-1] == 3
    # Same inputs, same seed: the same report.
    again = uncertainty.run(config, model, variables, [volume(1), volume(2)], lesion,
                            tmp_path / "again", max_patches=150, seed=0)  # fmt: skip
    assert again == payload
