"""The fused stem (p2l.stem) and the other fast formulations give the layer-by-layer results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2l import layers, losses, stem
from p2l import model as model_lib

EPS = layers.BN_EPSILON


def _layer_by_layer(x, kernel, scale, bias):
    """lax.conv -> two-pass biased batch statistics -> normalise -> ReLU -> nn.max_pool."""
    y = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), [(3, 3)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    mean = y.mean((0, 1, 2))
    var = ((y - mean) ** 2).mean((0, 1, 2))
    y = (y - mean) * jax.lax.rsqrt(var + EPS) * scale + bias
    return layers.max_pool_3x3_s2(jax.nn.relu(y)), mean, var


def _fused(x, kernel, scale, bias):
    k9 = kernel.reshape(9, -1)
    mean, var = stem.batch_statistics(x[..., 0], k9)
    folded, folded_bias = stem.fold_batch_norm(k9, mean, var, scale, bias, EPS)
    return stem.conv_relu_pool(x[..., 0], folded, folded_bias), mean, var


def _inputs(patch, n=32, channels=16, seed=0):
    kx, kw, ks = jax.random.split(jax.random.key(seed), 3)
    # Brain-like patches: zero background in one corner, as the rejection rule lets through.
    x = jax.random.uniform(kx, (n, patch, patch, 1)) * 3.0 + 1.0
    x = x.at[:, : patch // 3, : patch // 3].set(0.0)
    kernel = jax.random.normal(kw, (3, 3, 1, channels)) * 0.3
    scale = 1.0 + 0.5 * jax.random.normal(ks, (channels,))
    bias = jnp.linspace(-0.3, 0.3, channels)
    return x, kernel, scale, bias


@pytest.mark.parametrize("patch", [24, 12, 20, 9])
def test_fused_stem_equals_conv_batchnorm_relu_maxpool(patch):
    x, kernel, scale, bias = _inputs(patch)
    want, want_mean, want_var = jax.jit(_layer_by_layer)(x, kernel, scale, bias)
    got, mean, var = jax.jit(_fused)(x, kernel, scale, bias)
    assert got.shape == want.shape == (x.shape[0], *stem.output_size(patch)[1:] * 2, 16)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fused_stem_gradients_equal_the_layer_by_layer_ones():
    x, kernel, scale, bias = _inputs(24)
    cot = jax.random.normal(jax.random.key(5), (x.shape[0], 7, 7, 16))

    def loss(f):
        return jax.jit(
            jax.grad(lambda x, k, s, b: jnp.sum(f(x, k, s, b)[0] * cot), argnums=(0, 1, 2, 3))
        )

    for got, want in zip(
        loss(_fused)(x, kernel, scale, bias), loss(_layer_by_layer)(x, kernel, scale, bias)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_custom_backward_equals_autodiff_of_the_same_forward():
    """Routing to the first maximum of each window; checked where autodiff has no ties to split."""
    _, kernel, _, bias = _inputs(24, n=8)
    x = jax.random.uniform(jax.random.key(7), (8, 24, 24, 1))  # no constant areas, no ties
    k9 = kernel.reshape(9, -1)

    def via(f):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(x[..., 0], k9, bias)

    custom = jax.jit(lambda: via(stem.conv_relu_pool))()
    plain = jax.jit(lambda: via(lambda *a: stem._forward(*a)))()
    for a, b in zip(custom, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_ties_go_to_the_first_maximum_like_xla_max_pool():
    """Constant patches: every window is a tie; gradients must land where nn.max_pool puts them."""
    x = jnp.ones((2, 12, 12))
    k9 = jnp.ones((9, 3)) * 0.1
    bias = jnp.zeros((3,))
    cot = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))

    def plain(x, k):
        y = jax.lax.conv_general_dilated(
            x[..., None], k.reshape(3, 3, 1, 3), (2, 2), [(3, 3)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        return layers.max_pool_3x3_s2(jax.nn.relu(y))

    want = jax.grad(lambda x, k: jnp.sum(plain(x, k) * cot), argnums=(0, 1))(x, k9)
    got = jax.grad(lambda x, k: jnp.sum(stem.conv_relu_pool(x, k, bias) * cot), argnums=(0, 1))(
        x, k9
    )
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_masked_statistics_use_only_valid_patches():
    x, kernel, _, _ = _inputs(24, n=12)
    valid = jnp.arange(12) < 7
    garbage = x.at[7:].set(1e3)
    k9 = kernel.reshape(9, -1)
    mean, var = stem.batch_statistics(garbage[..., 0], k9, valid)
    want_mean, want_var = stem.batch_statistics(x[:7, ..., 0], k9)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-5)


def _model_step(impl, dtype):
    """Train-mode loss, gradients and batch-stats update of Patch2Loc(conv_impl=impl) in dtype."""
    cast = lambda t: jax.tree_util.tree_map(lambda a: a.astype(dtype), t)  # noqa: E731
    variables = cast(model_lib.init_variables(model_lib.Patch2Loc(), jax.random.key(0), 24))
    x = jax.random.uniform(jax.random.key(1), (24, 24, 24, 1), dtype)
    pos = jnp.linspace(0, 99, 24, dtype=dtype)
    target = jax.random.uniform(jax.random.key(2), (24, 2), dtype) * 100
    weight = (jnp.arange(24) < 20).astype(dtype)  # 4 padding slots, as a static-shape batch

    def loss(params):
        (mean, logvar), state = model_lib.Patch2Loc(conv_impl=impl, dtype=dtype).apply(
            {**variables, "params": params}, x, pos, train=True, mask_N=weight,
            mutable=["batch_stats"],
        )  # fmt: skip
        return losses.location_loss("beta_nll", mean, logvar, target, weight), state

    (value, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return value, state, grads


def _worst_relative(ga, gb):
    """Largest leaf error relative to the leaf's scale (at least 1e-3 of the overall scale:
    linear biases in front of BatchNorm have a zero gradient up to rounding noise)."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)
    overall = max(float(jnp.max(jnp.abs(b))) for b in leaves_b)
    worst = 0.0
    for a, b in zip(leaves_a, leaves_b, strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-3 * overall)
        worst = max(worst, float(jnp.max(jnp.abs(a - b))) / scale)
    return worst


@pytest.mark.slow  # whole model in float64, both forms: minutes
def test_fast_model_is_the_same_function_as_plain_xla_in_float64():
    """conv_impl="auto" (fused stem, matmul on maps <= 2x2 out, pointwise 1x1) vs "xla": in
    float64 the train-mode loss, every gradient and the batch-stats update agree to ~1e-13, so
    the float32 differences below are rounding, not formulation."""
    with jax.enable_x64(True):
        (la, sa, ga), (lb, sb, gb) = (_model_step(i, jnp.float64) for i in ("auto", "xla"))
        assert float(abs(la - lb)) <= 1e-10 * float(abs(lb))
        for a, b in zip(jax.tree_util.tree_leaves(sa), jax.tree_util.tree_leaves(sb), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        assert _worst_relative(ga, gb) < 1e-9


@pytest.mark.slow  # whole model train step, both forms
def test_fast_model_matches_plain_xla_in_float32():
    """float32: BatchNorm's backward at initialisation amplifies reduction-order rounding (and a
    near-tie in a max-pool window may route differently); measured worst leaf error ~5e-3."""
    (la, sa, ga), (lb, sb, gb) = (_model_step(i, jnp.float32) for i in ("auto", "xla"))
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(sa), jax.tree_util.tree_leaves(sb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert _worst_relative(ga, gb) < 2e-2


def test_fused_stem_keeps_the_variable_tree():
    a = model_lib.init_variables(model_lib.Patch2Loc(conv_impl="auto"), jax.random.key(0), 24)
    b = model_lib.init_variables(model_lib.Patch2Loc(conv_impl="xla"), jax.random.key(0), 24)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
    enc = a["params"]["encoder"]
    np.testing.assert_array_equal(enc["conv1"]["kernel"], b["params"]["encoder"]["conv1"]["kernel"])
    assert isinstance(layers.BatchNormState(4), nn.Module)
