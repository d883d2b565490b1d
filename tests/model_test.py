import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2l import layers
from p2l import model as model_lib


@pytest.fixture(scope="module")
def variables():
    return model_lib.init_variables(model_lib.Patch2Loc(), jax.random.key(0), 24)


def test_parameter_count_matches_reference(variables):
    # spec §3.1: encoder 11,167,680 + two heads of 340,194.
    assert model_lib.count_params(variables["params"]) == 11_848_068
    assert model_lib.count_params(variables["params"]["encoder"]) == 11_167_680
    assert model_lib.count_params(variables["params"]["mean_head"]) == 340_194


def test_output_shapes_and_feature_map_sizes(variables):
    x = jnp.zeros((3, 24, 24, 1))
    mean, logvar = model_lib.Patch2Loc().apply(variables, x, jnp.arange(3.0))
    assert mean.shape == (3, 2) and logvar.shape == (3, 2)
    # 24 -> conv1 (k3, s2, p3) 14 -> maxpool 7 -> 7 -> 4 -> 2 -> 1 (spec §3.1). The layer-by-layer
    # form, where conv1's 14x14 output exists ("auto" fuses the stem and never forms it).
    m = model_lib.Patch2Loc(conv_impl="xla")
    _, inter = m.apply(
        variables, x, jnp.arange(3.0), capture_intermediates=True, mutable=["intermediates"]
    )
    enc = inter["intermediates"]["encoder"]
    assert enc["conv1"]["__call__"][0].shape == (3, 14, 14, 64)
    assert enc["layer1_1"]["__call__"][0].shape == (3, 7, 7, 64)
    assert enc["layer2_1"]["__call__"][0].shape == (3, 4, 4, 128)
    assert enc["layer3_1"]["__call__"][0].shape == (3, 2, 2, 256)
    assert enc["layer4_1"]["__call__"][0].shape == (3, 1, 1, 512)


@pytest.mark.parametrize(
    "size,cin,cout,stride,pad,k",
    [
        (2, 5, 7, 1, 1, 3),
        (2, 5, 7, 2, 1, 3),
        (1, 6, 4, 1, 1, 3),
        (2, 3, 4, 2, 0, 1),
        (3, 2, 3, 2, 1, 3),
        (4, 5, 7, 2, 1, 3),  # layer3's 4x4 -> 2x2: 25 of 64 pixel pairs, per-output-pixel form
    ],
)
def test_conv_as_matmul_is_exact(size, cin, cout, stride, pad, k):
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (4, size, size, cin))
    w = jax.random.normal(kw, (k, k, cin, cout))
    want = jax.lax.conv_general_dilated(
        x, w, (stride, stride), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    got = layers.conv_as_matmul(x, w, stride, pad)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fast_conv_formulation_equals_xla(variables):
    x = jax.random.normal(jax.random.key(2), (16, 24, 24, 1))
    pos = jnp.linspace(0, 99, 16)
    fast = model_lib.Patch2Loc(conv_impl="auto").apply(variables, x, pos)
    ref = model_lib.Patch2Loc(conv_impl="xla").apply(variables, x, pos)
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # train-mode forward of the full model at two batch sizes
def test_masked_batchnorm_ignores_padding_slots(variables):
    """Weight-0 slots must not change batch statistics (static-shape batches, p2l.patches)."""
    m = model_lib.Patch2Loc()
    x = jax.random.normal(jax.random.key(3), (12, 24, 24, 1))
    pos = jnp.arange(12.0)
    weight = jnp.array([1.0] * 8 + [0.0] * 4)
    garbage = x.at[8:].set(1e3)
    (a, _), sa = m.apply(variables, x[:8], pos[:8], train=True, mutable=["batch_stats"])
    (b, _), sb = m.apply(
        variables, garbage, pos, train=True, mask_N=weight, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(a, b[:8], rtol=1e-4, atol=1e-4)
    for u, v in zip(jax.tree_util.tree_leaves(sa), jax.tree_util.tree_leaves(sb)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_slice_position_encoding_interleaves_sin_cos():
    pe = model_lib.slice_position_encoding(jnp.array([0.0, 7.0]), 512)
    assert pe.shape == (2, 512)
    np.testing.assert_allclose(pe[0, 0::2], 0.0, atol=1e-7)
    np.testing.assert_allclose(pe[0, 1::2], 1.0, atol=1e-7)
    freqs = np.exp(np.arange(0, 512, 2) * (-np.log(10000.0) / 512))
    np.testing.assert_allclose(pe[1, 0::2], np.sin(7.0 * freqs), atol=1e-5)
    np.testing.assert_allclose(pe[1, 1::2], np.cos(7.0 * freqs), atol=1e-5)


@pytest.mark.slow  # gradients of the full model twice
def test_detach_variance_stops_gradient_into_encoder(variables):
    x = jax.random.normal(jax.random.key(4), (4, 24, 24, 1))
    pos = jnp.arange(4.0)

    def logvar_sum(params, detach):
        m = model_lib.Patch2Loc(detach_variance=detach)
        _, logvar = m.apply({**variables, "params": params}, x, pos)
        return jnp.sum(logvar)

    g_detached = jax.grad(logvar_sum)(variables["params"], True)
    g_attached = jax.grad(logvar_sum)(variables["params"], False)
    enc_norm = lambda g: float(  # noqa: E731
        sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(g["encoder"]))
    )
    assert enc_norm(g_detached) == 0.0
    assert enc_norm(g_attached) > 0.0
