"""The denoising-autoencoder detector: U-Net, coarse noise, loss, optimiser, steps, checkpoint,
volume scorer (p2l.dae_model, p2l.dae_noise, p2l.dae_step, p2l.dae_scoring), and the helpers it
shares with Patch2Loc (p2l.train_state.keep_if_finite, p2l.scoring.postprocessed). Tiny sizes,
CPU."""

from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from p2l import checkpoint, dae_noise, heatmaps, parallel, postprocess
from p2l.dae_model import (
    ConvBlock,
    DenoisingUNet,
    WSConv3x3,
    create_dae_model,
    init_dae_variables,
    norm_groups,
    standardize_weight,
)
from p2l.dae_scoring import DAEScorer
from p2l.dae_step import (
    create_dae_state,
    dae_loss,
    foreground,
    make_dae_eval_step,
    make_dae_optimizer,
    make_dae_train_step,
    make_reconstruct,
    scale_by_torch_amsgrad,
)
from p2l.errors import ConfigError
from p2l.model import count_params
from p2l.scoring import postprocessed
from p2l.train_state import TrainState, keep_if_finite

SIDE = 32


# XLA:CPU compiles threefry slowly (seconds per distinct shape on a loaded 2-core machine, once
# per parameter shape when a model is initialised); what these tests check does not depend on
# the PRNG, so model initialisation and training steps use the cheap "rbg" keys. The noise
# tests use the default keys, as training does.
def fast_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


# One compilation per shape for all the noise tests.
noise_fn = jax.jit(dae_noise.coarse_noise, static_argnums=(1, 2, 3, 4, 5))
draw_fn = jax.jit(dae_noise.draw_noise, static_argnums=(1, 2, 3, 4, 5))
NOISE_SHAPE = (256, 64, 64)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dae = dict(depth=3, width=8, noise_std=0.2, noise_res=16, eval_slices=2)
    c.optim = dict(learning_rate=1e-3, decay_steps=1000, weight_decay=1e-5)
    c.model = dict(dtype="float32")
    c.eval = dict(median_size=3, erode_mask_iterations=0)
    c.data = dict(image_shape=(SIDE, SIDE, 6))
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def disk(radius: float, cy: float, cx: float, side: int = SIDE) -> np.ndarray:
    y, x = np.mgrid[:side, :side]
    return ((y - cy) ** 2 + (x - cx) ** 2 <= radius**2).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = create_dae_model(config)
    return config, model, init_dae_variables(model, fast_key(0), SIDE, SIDE)


@pytest.fixture(scope="module")
def apply_fn(tiny):
    return jax.jit(tiny[1].apply)


# --- model --------------------------------------------------------------------------------------


def test_model_maps_slices_to_slices(tiny, apply_fn):
    _, _, variables = tiny
    assert set(variables) == {"params"}
    out = apply_fn(variables, jnp.ones((5, SIDE, SIDE, 1)))  # the shape of the scorer's test
    assert out.shape == (5, SIDE, SIDE, 1) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_slices_the_u_net_cannot_pool_are_a_config_error(tiny):
    _, model, _ = tiny  # depth 3: two poolings, sides must be multiples of 4
    with pytest.raises(ConfigError, match="dae.depth.*multiples of 4"):
        jax.eval_shape(lambda: init_dae_variables(model, jax.random.key(0), 30, SIDE))
    with pytest.raises(ConfigError, match="dae.depth"):
        init_dae_variables(model, jax.random.key(0), SIDE, 18)
    # 4x4 pools to 1x1, which the reflection padding cannot pad (PyTorch refuses it too).
    with pytest.raises(ConfigError, match="at least 8"):
        init_dae_variables(model, jax.random.key(0), 4, SIDE)


def test_the_group_count_is_their_rule_and_dae_groups_is_refused():
    # The median divisor: 64 has 1 2 4 [8] 16 32 64, 128 has 1 2 4 8 [16] 32 64 128 (the upper
    # middle one of an even count), 512 has 1 2 4 8 16 [32] 64 128 256 512.
    assert [norm_groups(c) for c in (64, 128, 256, 512)] == [8, 16, 16, 32]
    assert [norm_groups(c) for c in (1, 8, 12, 16)] == [1, 4, 4, 4]
    # A config that names dae.groups is of the earlier network: its checkpoints must not load.
    with pytest.raises(ConfigError, match="dae.groups"):
        create_dae_model(tiny_config(**{"dae.groups": 8}))


def test_weight_standardised_conv_on_a_hand_example():
    # Raw kernel 2 * centre + 5: per filter mean 2/9 + 5, centred 2 * (centre - 1/9), unbiased
    # std (torch's, n - 1 = 8) sqrt(2^2 * (64/81 + 8/81) / 8) = 2/3, plus eps 1e-5: the
    # standardised kernel is (centre - 1/9) * 2 / (2/3 + 1e-5) ~ 3 centre - 1/3.
    raw = np.full((3, 3, 1, 1), 5.0, np.float32)
    raw[1, 1] += 2.0
    scale = 2.0 / (2.0 / 3.0 + 1e-5)
    expected_kernel = (np.eye(3)[1][:, None] * np.eye(3)[1][None, :] - 1 / 9) * scale
    np.testing.assert_allclose(standardize_weight(jnp.asarray(raw))[..., 0, 0], expected_kernel,
                               rtol=1e-6)  # fmt: skip
    # x = [[1, 2], [3, 4]] reflection-padded by 1 (the edge is not repeated):
    #   4 3 4 3 / 2 1 2 1 / 4 3 4 3 / 2 1 2 1
    # out = 3 * centre - (sum of the 3x3 window) / 3 (times scale / 3), plus the bias 0.5:
    #   (0,0): 3 - 27/3 = -6; (0,1): 6 - 24/3 = -2; (1,0): 9 - 21/3 = 2; (1,1): 12 - 18/3 = 6.
    # (Zero padding would give 3 - 10/3 at (0,0); the biased std would scale everything by 1.06.)
    x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]
    variables = {"params": {"kernel": jnp.asarray(raw), "bias": jnp.asarray([0.5])}}
    out = np.asarray(WSConv3x3(1).apply(variables, x))[0, :, :, 0]
    # float32 rounding only: the eps alone moves the values by ~1e-4.
    np.testing.assert_allclose(out, np.array([[-6.0, -2.0], [2.0, 6.0]]) * scale / 3 + 0.5,
                               rtol=0, atol=1e-5)  # fmt: skip
    # Per output channel of any kernel: mean 0 over (kh, kw, in), unbiased std 1 (to eps).
    w = np.random.default_rng(0).standard_normal((3, 3, 4, 5)).astype(np.float32) * 0.1 + 0.3
    ws = np.asarray(standardize_weight(jnp.asarray(w))).reshape(-1, 5)
    np.testing.assert_allclose(ws.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(ws.std(axis=0, ddof=1), 1, rtol=1e-3)


def test_block_ends_in_group_norm_and_the_u_net_pools_by_averaging(tiny):
    _, model, variables = tiny

    # Each level's block input and output, returned from one compiled forward.
    @jax.jit
    def blocks(x):
        seen = {}

        def capture(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, ConvBlock):
                seen[context.module.name] = (args[0], out)
            return out

        with nn.intercept_methods(capture):
            model.apply(variables, x)
        return seen

    seen = blocks(jnp.asarray(np.random.default_rng(2).random((2, 8, 8, 1)), jnp.float32))
    above = np.asarray(seen["down0"][1])  # (2, 8, 8, 8): width 8, norm_groups(8) = 4 groups
    # GroupNorm last (scale 1, offset 0 at init): every (slice, group of 2 channels) has mean 0
    # and variance 1 over its pixels, while single channels do not (Swish after the norm would
    # leave no group at mean 0; 8 groups would centre every channel).
    groups = above.reshape(2, 8, 8, 4, 2)
    np.testing.assert_allclose(groups.mean(axis=(1, 2, 4)), 0, atol=1e-5)
    np.testing.assert_allclose(groups.var(axis=(1, 2, 4)), 1, atol=1e-3)
    assert np.abs(above.mean(axis=(1, 2))).max() > 0.05
    # Between levels the features are the 2x2 averages of the level above's block output.
    pooled = above.reshape(2, 4, 2, 4, 2, 8).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(seen["down1"][0]), pooled, atol=1e-6)


def test_parameter_count_of_their_brats_u_net():
    # Block(cin, c) = WS conv3x3 9*cin*c + c, GroupNorm 2c, WS conv3x3 9*c*c + c, GroupNorm 2c
    #              = 9*cin*c + 9*c^2 + 6c (weight standardisation and Swish have no parameters).
    # Down:  Block(1, 64) 37,824 + Block(64, 128) 221,952 + Block(128, 256) 886,272
    #        + Block(256, 512) 3,542,016                                       = 4,688,064
    # Up:    upconv(cin -> c) 4*cin*c + c, then Block(2c, c):
    #        512->256: 524,544 + 1,771,008; 256->128: 131,200 + 443,136;
    #        128->64: 32,832 + 110,976                                         = 3,013,696
    # Last:  1x1 conv 64 -> 1: 65.                               Total         = 7,701,825
    model = DenoisingUNet(depth=4, width=64)
    shapes = jax.eval_shape(lambda: init_dae_variables(model, jax.random.key(0), 192, 192))
    assert count_params(shapes["params"]) == 7_701_825


# --- noise --------------------------------------------------------------------------------------


def test_align_corners_upsampling_hits_the_grid_and_is_linear_between():
    grid = jnp.asarray([[[0.0, 3.0], [6.0, 9.0]]])
    out = np.asarray(dae_noise.upsample_bilinear(grid, 4, 4))[0]
    # align_corners=True puts grid points at pixels 0 and 3: value 2y + x at pixel (y, x).
    assert [out[0, 0], out[0, 3], out[3, 0], out[3, 3]] == [0.0, 3.0, 6.0, 9.0]  # exact
    np.testing.assert_allclose(out, 2 * np.arange(4)[:, None] + np.arange(4)[None, :], atol=1e-6)
    # A 4x4 grid on 32 px: grid point i at pixel 31*i/3; every corner exact.
    g = np.random.default_rng(1).standard_normal((1, 4, 4)).astype(np.float32)
    up = np.asarray(dae_noise.upsample_bilinear(jnp.asarray(g), SIDE, SIDE))[0]
    assert [up[0, 0], up[0, -1], up[-1, 0], up[-1, -1]] == [g[0, 0, 0], g[0, 0, -1],
                                                             g[0, -1, 0], g[0, -1, -1]]  # fmt: skip
    np.testing.assert_allclose(up, heatmaps.upsample_align_corners(g, SIDE, SIDE)[0], atol=1e-6)


def test_every_slice_is_rolled_by_its_own_shift():
    key = jax.random.key(2)
    noise = np.asarray(noise_fn(key, *NOISE_SHAPE, 0.2, 16))
    grid, shifts = (np.asarray(a) for a in draw_fn(key, *NOISE_SHAPE, 0.2, 16))
    assert len({tuple(s) for s in shifts[:8]}) > 1
    assert ((shifts >= 0) & (shifts < 64)).all()
    for b in range(8):  # torch.roll(upsample_bilinear(grid), shifts) slice by slice
        up = heatmaps.upsample_align_corners(grid[b : b + 1], 64, 64)[0]
        np.testing.assert_allclose(noise[b], np.roll(up, tuple(shifts[b]), axis=(0, 1)), atol=1e-6)


def test_noise_statistics_and_smoothness():
    noise = np.asarray(noise_fn(jax.random.key(3), *NOISE_SHAPE, 0.2, 16))
    assert noise.shape == NOISE_SHAPE and noise.dtype == np.float32
    # Bilinear averaging lowers the RMS below std (about 2/3 of it); 65,536 independent grid
    # values make the measured RMS good to ~1%.
    expected = dae_noise.expected_rms(64, 64, 0.2, 16)
    assert 0.6 * 0.2 < expected < 0.7 * 0.2
    assert abs(np.sqrt(np.mean(noise**2)) - expected) < 0.05 * expected
    assert abs(np.mean(noise)) < 0.01
    # Neighbours share their grid taps (4.2 px between grid points): strongly correlated, even
    # across the roll's wrap-around seam.
    for a, b in ((noise[:, :, 1:], noise[:, :, :-1]), (noise[:, 1:], noise[:, :-1])):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.85
    # Same key, same noise; another key, other noise.
    np.testing.assert_array_equal(noise, np.asarray(noise_fn(jax.random.key(3), *NOISE_SHAPE,
                                                             0.2, 16)))  # fmt: skip
    other = np.asarray(noise_fn(jax.random.key(4), *NOISE_SHAPE, 0.2, 16))
    assert np.abs(noise - other).mean() > 0.05


def test_added_noise_is_zero_outside_the_mask():
    image = jnp.asarray(np.stack([disk(10, 16, 16), disk(6, 10, 20)]))
    mask = image.astype(jnp.uint8)
    noisy = np.asarray(jax.jit(dae_noise.add_noise, static_argnums=(3, 4))(
        jax.random.key(4), image, mask, 0.2, 16))  # fmt: skip
    outside = np.asarray(mask) == 0
    assert (noisy[outside] == np.asarray(image)[outside]).all()
    assert (noisy[~outside] != np.asarray(image)[~outside]).mean() > 0.99


# --- loss and optimiser -------------------------------------------------------------------------


def test_loss_averages_over_the_real_slices_only():
    recon = np.zeros((3, 2, 2), np.float32)
    clean = np.zeros((3, 2, 2), np.float32)
    mask = np.zeros((3, 2, 2), np.float32)
    recon[0] = [[1, 2], [3, 4]]  # slice 0, mask keeps pixels (0,0), (1,1): 1 + 16
    mask[0] = [[1, 0], [0, 1]]
    clean[1] = [[0, 0], [0, 2]]  # slice 1, mask everywhere: 4
    mask[1] = 1
    # Row 2 pads the batch: zero image and mask. Two real slices of 4 pixels: 21 / 8.
    loss = dae_loss(jnp.asarray(recon), jnp.asarray(clean), jnp.asarray(mask), num_slices=2)
    assert float(loss) == pytest.approx(21 / 8)


def test_the_foreground_is_their_mask():
    image = jnp.asarray([[[0.0, 0.01, 0.0101], [-1.0, 0.5, 1.0]]])
    np.testing.assert_array_equal(foreground(image), [[[0, 0, 1], [0, 1, 1]]])


def _torch_adam_amsgrad(p, grads, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam(amsgrad=True, weight_decay=wd), written out (float64)."""
    m = v = v_max = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g + wd * p  # coupled L2
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = np.maximum(v_max, v)  # the raw second moment, not the bias-corrected one
        denom = np.sqrt(v_max) / np.sqrt(1 - b2**t) + eps
        p = p - lr / (1 - b1**t) * m / denom
    return p


def test_optimizer_is_torch_adam_with_amsgrad_and_coupled_decay():
    config = tiny_config(**{"optim.learning_rate": 0.1, "optim.decay_steps": 4,
                            "optim.weight_decay": 0.01})  # fmt: skip
    # A large first gradient, then ~0 for the first parameter: AMSGrad's max is the first v.
    grads = [np.array([1.0, -0.5]), np.array([0.0, 3.0])]
    # Cosine from 0.1 over 4 steps: step 1 at t=0, step 2 at t=1.
    lrs = [0.1, 0.1 * 0.5 * (1 + np.cos(np.pi / 4))]
    expected = _torch_adam_amsgrad(np.array([1.0, -2.0]), grads, lrs, wd=0.01)

    def run(tx):
        params = {"w": jnp.asarray([1.0, -2.0])}
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
            params = optax.apply_updates(params, updates)
        return np.asarray(params["w"])

    np.testing.assert_allclose(run(make_dae_optimizer(config)), expected, rtol=1e-5)
    # optax.amsgrad keeps the max of the bias-corrected v instead: a smaller second step here.
    schedule = optax.cosine_decay_schedule(0.1, 4)
    optax_amsgrad = optax.chain(optax.add_decayed_weights(0.01), optax.amsgrad(schedule))
    assert abs(run(optax_amsgrad)[0] - expected[0]) > 1e-3
    # After decay_steps the learning rate stays 0.
    assert float(optax.cosine_decay_schedule(0.1, 4)(10)) == 0.0


def test_the_flattened_optimizer_gives_the_same_updates():
    # make_dae_optimizer runs on the parameters raveled into one vector (optax.flatten), for
    # compile time: every transformation is elementwise, so op by op the updates are bit for bit
    # those of the same chain on the parameter tree. (Compiled, XLA's fusions may round the last
    # bit differently, 1 ulp here, as they do between the tree chain jitted and op by op.)
    config = tiny_config(**{"optim.decay_steps": 5, "optim.weight_decay": 0.01})
    schedule = optax.cosine_decay_schedule(config.optim.learning_rate, 5)
    tree_tx = optax.chain(optax.add_decayed_weights(0.01), scale_by_torch_amsgrad(),
                          optax.scale_by_learning_rate(schedule))  # fmt: skip
    flat_tx = make_dae_optimizer(config)
    rng = np.random.default_rng(5)
    params = {"a": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
              "b": {"c": jnp.asarray(rng.standard_normal(4), jnp.float32)}}  # fmt: skip
    tree_state, flat_state = tree_tx.init(params), flat_tx.init(params)
    assert flat_state[1].mu.shape == (10,)  # the moments are one vector
    for step in range(4):
        grads = jax.tree_util.tree_map(lambda p, s=step: p * (s - 1.5) + 0.1 * s, params)
        u_tree, tree_state = tree_tx.update(grads, tree_state, params)
        u_flat, flat_state = flat_tx.update(grads, flat_state, params)
        for a, b in zip(jax.tree_util.tree_leaves(u_tree), jax.tree_util.tree_leaves(u_flat)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        params = optax.apply_updates(params, u_flat)


# --- steps --------------------------------------------------------------------------------------


def _slice_batch(rows: int = 4, real: int = 3) -> dict:
    image = np.zeros((rows, SIDE, SIDE), np.float32)
    mask = np.zeros((rows, SIDE, SIDE), np.uint8)
    for i, (r, cy, cx) in enumerate([(10, 16, 16), (8, 12, 18), (12, 17, 15)][:real]):
        image[i] = disk(r, cy, cx) * (1.0 + 0.2 * i)
        mask[i] = disk(r + 2, cy, cx)
    # "stop" as p2l.train feeds it (one compiled step: the batch's structure never changes).
    return {
        "image": image,
        "mask_one": mask,
        "position": np.zeros(rows, np.float32),
        "slice_index": np.arange(rows, dtype=np.int32),
        "stop": np.zeros(rows, np.int32),
    }


@pytest.fixture(scope="module")
def steps(tiny):
    """(mesh, step-0 state on the host, train step, eval step) of the tiny model on 3 real rows
    of 4: compiled once for the tests below (a train step compiles for seconds on XLA:CPU)."""
    config, model, _ = tiny
    mesh = parallel.create_mesh(jax.devices()[:1])
    tx = make_dae_optimizer(config)
    state = jax.device_get(create_dae_state(config, model, tx, fast_key(0)))
    train_step = make_dae_train_step(model, tx, config, 3, mesh)
    return mesh, state, train_step, make_dae_eval_step(model, config, 3, mesh)


def test_training_lowers_the_loss_and_a_non_finite_step_changes_nothing(steps):
    mesh, state, train_step, eval_step = steps
    state = jax.device_put(state, parallel.replicated(mesh))  # the step donates it
    batch = parallel.to_global(_slice_batch(), mesh)
    key = fast_key(7)
    before = {k: float(v) for k, v in eval_step(state, batch, key).items()}
    for step in range(30):
        state, metrics = train_step(state, batch, jax.random.fold_in(key, step))
        assert float(metrics["finite"]) == 1.0
    after = {k: float(v) for k, v in eval_step(state, batch, key).items()}
    assert int(state.step) == 30
    assert after["val_loss"] < 0.5 * before["val_loss"]
    assert after["val_mae"] < before["val_mae"]
    assert metrics["valid_slices"] == 3.0
    assert 0.05 < float(metrics["noise_rms"]) < 0.2
    assert set(metrics) == {"loss", "grad_norm", "param_norm", "finite", "stop", "noise_rms",
                            "valid_slices"}  # fmt: skip
    assert float(metrics["stop"]) == 0.0

    saved = jax.device_get(state)
    bad = _slice_batch()
    bad["image"][0, 16, 16] = np.nan
    bad["stop"][1] = 1
    state, metrics = train_step(state, parallel.to_global(bad, mesh), key)
    assert float(metrics["finite"]) == 0.0 and float(metrics["stop"]) == 1.0
    assert int(state.step) == 30
    for old, new in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(old, np.asarray(new))


def test_noise_and_loss_are_on_the_slice_foreground_not_the_brain_mask(apply_fn, steps):
    mesh, state, train_step, eval_step = steps
    batch = _slice_batch()
    batch["image"][0, 14:18, 14:18] = 0.005  # dark brain voxels: not foreground
    key = fast_key(3)
    clean = jnp.asarray(batch["image"])
    fg = (clean > 0.01).astype(jnp.float32)

    def by_hand(fold: int) -> tuple[float, float, float]:
        """(loss, MAE on the foreground, noise RMS on it) with the noise of fold_in(key, fold)
        on image > 0.01 only."""
        noise = dae_noise.masked_noise(jax.random.fold_in(key, fold), fg, 0.2, 16)
        assert float(jnp.sum(jnp.abs(noise) * (1 - fg))) == 0.0
        assert float(jnp.max(jnp.abs(noise[0, 14:18, 14:18]))) == 0.0
        # 5 rows: the shape apply_fn is compiled for by the other tests.
        noisy = jnp.concatenate([clean + noise, jnp.zeros((1, SIDE, SIDE))])[..., None]
        recon = apply_fn({"params": state.params}, noisy)[:4, ..., 0]
        n = jnp.sum(fg)
        return (float(jnp.sum(jnp.square(recon - clean) * fg) / (3 * SIDE * SIDE)),
                float(jnp.sum(jnp.abs(recon - clean) * fg) / n),
                float(jnp.sqrt(jnp.sum(jnp.square(noise) * fg) / n)))  # fmt: skip

    repl = parallel.replicated(mesh)
    got = {k: float(v) for k, v in eval_step(state, parallel.to_global(batch, mesh), key).items()}
    loss, mae, _ = by_hand(1)
    assert got["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert got["val_mae"] == pytest.approx(mae, rel=1e-5)
    # The brain mask is not read: another (here none) mask_one, the same result.
    batch["mask_one"][:] = 0
    again = eval_step(state, parallel.to_global(batch, mesh), key)
    assert {k: float(v) for k, v in again.items()} == got
    # The train step's loss (before its update) and noise: the same rule, noise of fold 0.
    _, metrics = train_step(jax.device_put(state, repl), parallel.to_global(batch, mesh), key)
    loss, _, rms = by_hand(0)
    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(metrics["noise_rms"]) == pytest.approx(rms, rel=1e-5)


def test_a_non_finite_step_keeps_every_leaf_of_the_old_state():
    old = TrainState(step=jnp.int32(4), params={"w": jnp.ones(3)}, batch_stats={},
                     opt_state=(jnp.zeros(2), {"m": jnp.ones((2, 2))}))  # fmt: skip
    new = jax.tree_util.tree_map(lambda x: x + 1, old)
    for finite, want in ((jnp.bool_(True), new), (jnp.bool_(False), old)):
        kept = jax.jit(keep_if_finite)(finite, new, old)
        assert jax.tree_util.tree_structure(kept) == jax.tree_util.tree_structure(old)
        for a, b in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_dae_state_round_trips_through_a_checkpoint(tiny, tmp_path):
    config, model, _ = tiny
    tx = make_dae_optimizer(config)
    state = create_dae_state(config, model, tx, fast_key(1))
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(5, state)
    ckpt.close()
    again = checkpoint.Checkpointer(tmp_path)
    restored = again.restore(create_dae_state(config, model, tx, fast_key(2)))
    again.close()
    assert restored.batch_stats == {}
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for old, new in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))


# --- scoring ------------------------------------------------------------------------------------


def _volume(seed: int, depth: int = 5):
    rng = np.random.default_rng(seed)
    mask = np.zeros((SIDE, SIDE, depth), np.float32)
    for z in range(1, depth - 1):
        mask[..., z] = disk(9 + z, 16, 16)
    image = (mask * (1 + 0.1 * rng.standard_normal(mask.shape))).astype(np.float32)
    return SimpleNamespace(subject_id=f"s{seed}", image=image, mask=mask, seg=None)


def test_dae_scorer_scores_a_volume(tiny, apply_fn):
    config, model, variables = tiny
    scorer = DAEScorer(config, model, variables)
    vol = _volume(0)
    scored = scorer.start(vol.subject_id, vol.image, vol.mask).result()
    shape = vol.image.shape
    assert {k: v.shape for k, v in scored.maps.items()} == {k: shape for k in scored.maps}
    assert set(scored.maps) == {"score", "residual", "recon"}
    assert scored.patches_evaluated == shape[2]
    outside = vol.mask == 0
    assert (scored.score[outside] == 0).all() and (scored.maps["residual"][outside] == 0).all()
    # The reconstruction is the model's on each slice (5 slices in padded batches of 2).
    direct = apply_fn(variables, jnp.asarray(vol.image.transpose(2, 0, 1))[..., None])
    recon = np.asarray(direct)[..., 0].transpose(1, 2, 0)
    np.testing.assert_allclose(scored.maps["recon"], recon, atol=1e-5)
    residual = np.abs(vol.image - scored.maps["recon"])
    np.testing.assert_array_equal(scored.maps["residual"][~outside], residual[~outside])
    assert (scored.score[~outside] > 0).mean() > 0.9

    # Scorer's pipelining: the same results, in order.
    streamed = list(scorer.stream([vol, _volume(1)]))
    assert [v.subject_id for v, _ in streamed] == ["s0", "s1"]
    np.testing.assert_array_equal(streamed[0][1].score, scored.score)
    unfiltered = scorer(vol.subject_id, vol.image, vol.mask, filtered=False)
    np.testing.assert_array_equal(unfiltered.score, scored.maps["residual"])


def test_scores_are_post_processed_by_the_shared_rule(tiny):
    vol = _volume(2)
    raw = np.random.default_rng(3).random(vol.image.shape).astype(np.float32)
    for erode in (0, 1):
        ev = SimpleNamespace(erode_mask_iterations=erode)
        score, work_mask = postprocessed(ev, "s", raw, vol.mask, 3)
        want_mask = postprocess.erode_brain_mask(vol.mask, 1) if erode else vol.mask
        np.testing.assert_array_equal(work_mask, want_mask)
        np.testing.assert_array_equal(score, postprocess.postprocess(raw, want_mask, median_size=3))
    # The DAE scorer uses it: with erosion its mask and score are the eroded ones.
    config, model, variables = tiny
    eroding = tiny_config(**{"eval.erode_mask_iterations": 1})
    scored = DAEScorer(eroding, model, variables)(vol.subject_id, vol.image, vol.mask)
    np.testing.assert_array_equal(scored.mask, postprocess.erode_brain_mask(vol.mask, 1))
    want, _ = postprocessed(eroding.eval, vol.subject_id, scored.maps["residual"], vol.mask, 3)
    np.testing.assert_array_equal(scored.score, want)


def test_reconstruct_is_one_compiled_function_per_model(tiny):
    _, model, _ = tiny
    devices = tuple(jax.local_devices())
    assert make_reconstruct(model) is make_reconstruct(model, devices)
