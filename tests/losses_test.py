import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2l import losses

MEAN = jnp.array([[10.0, 20.0], [50.0, 50.0]])
LOGVAR = jnp.array([[0.0, np.log(4.0)], [np.log(0.25), 1.0]])
TARGET = jnp.array([[12.0, 20.0], [49.0, 53.0]])


def hand_nll(m, s, t):
    return 0.5 * ((t - m) ** 2 * np.exp(-s) + s)


def test_beta_nll_hand_computed():
    # patch 0: d=y: 0.5*(4*1 + 0) * 1^0.5 = 2; d=x: 0.5*(0 + ln4) * 4^0.5 = ln 4
    # patch 1: y: 0.5*(1*4 + ln.25) * .25^.5 ; x: 0.5*(9e^-1 + 1) * e^.5
    p0 = 2.0 + np.log(4.0)
    p1 = 0.5 * (4 + np.log(0.25)) * 0.5 + 0.5 * (9 * np.exp(-1) + 1) * np.exp(0.5)
    got = losses.beta_nll(MEAN, LOGVAR, TARGET, beta=0.5)
    np.testing.assert_allclose(got, [p0, p1], rtol=1e-6)
    loss = losses.location_loss("beta_nll", MEAN, LOGVAR, TARGET, jnp.ones(2), beta=0.5)
    np.testing.assert_allclose(loss, (p0 + p1) / 2, rtol=1e-6)


def test_beta_zero_is_plain_nll():
    got = losses.beta_nll(MEAN, LOGVAR, TARGET, beta=0.0)
    want = hand_nll(np.array(MEAN), np.array(LOGVAR), np.array(TARGET)).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_beta_weight_is_stop_gradient():
    # d/ds of 0.5*((t-m)^2 e^-s + s) * sg(e^s)^b = 0.5*(-(t-m)^2 e^-s + 1) * e^{b s}
    m, s, t = jnp.array([[0.0, 0.0]]), jnp.array([[0.3, -0.2]]), jnp.array([[2.0, 1.0]])
    g = jax.grad(lambda s_: losses.beta_nll(m, s_, t, 0.5).sum())(s)
    want = 0.5 * (-(np.array(t) ** 2) * np.exp(-np.array(s)) + 1) * np.exp(0.5 * np.array(s))
    np.testing.assert_allclose(g, want, rtol=1e-5)


def test_stirn_hand_computed_and_mean_gets_no_nll_gradient():
    got = losses.stirn(MEAN, LOGVAR, TARGET)
    m, s, t = np.array(MEAN), np.array(LOGVAR), np.array(TARGET)
    want = (0.5 * (t - m) ** 2 + hand_nll(m, s, t)).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    g = jax.grad(lambda mu: losses.stirn(mu, LOGVAR, TARGET).sum())(MEAN)
    np.testing.assert_allclose(g, -(t - m), rtol=1e-6)  # only the 1/2 (t-mu)^2 term


def test_mse_and_weighting():
    got = losses.mse(MEAN, LOGVAR, TARGET)
    np.testing.assert_allclose(got, [4.0, 10.0])
    # weight-0 slots (static-shape padding) are ignored by the mean
    loss = losses.location_loss("mse", MEAN, LOGVAR, TARGET, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(loss, 4.0)
    assert float(losses.weighted_mean(jnp.array([5.0]), jnp.array([0.0]))) == 0.0


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss type"):
        losses.location_loss("l1", MEAN, LOGVAR, TARGET, jnp.ones(2))
