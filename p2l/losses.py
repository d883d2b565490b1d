"""Location losses of the Gaussian-NLL family (spec §4). Pure functions of per-patch arrays.

Per patch: target t (N, 2), mean mu (N, 2), log-variance s (N, 2). Every loss sums over the two
coordinates and averages over *valid* patches (`weight_N` 1 for valid, 0 for the padding slots
of a static-shape batch — the reference averages over the accepted patches of a variable-size
batch, spec §3.2). No log(2*pi) constants, as the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("beta_nll", "stirn", "mse")


def weighted_mean(per_patch_N: jax.Array, weight_N: jax.Array) -> jax.Array:
    """sum(w * l) / sum(w); 0 when no patch is valid (instead of 0/0)."""
    total = jnp.sum(weight_N)
    return jnp.sum(per_patch_N * weight_N) / jnp.maximum(total, 1.0)


def beta_nll(mean, logvar, target, beta: float = 0.5):
    """Per-patch beta-NLL (Seitzer et al.): sum_d 1/2((t-mu)^2 e^-s + s) * stopgrad(e^s)^beta."""
    nll = 0.5 * ((target - mean) ** 2 * jnp.exp(-logvar) + logvar)
    if beta > 0:  # the reference applies the weight only when beta > 0
        nll = nll * jax.lax.stop_gradient(jnp.exp(logvar)) ** beta
    return jnp.sum(nll, axis=-1)


def stirn(mean, logvar, target):
    """Per-patch Stirn et al. loss: sum_d 1/2 (t-mu)^2 + 1/2((t - stopgrad(mu))^2 e^-s + s).

    The variance head must also be fed a stop-gradient latent (model `detach_variance=True`).
    """
    mse_term = 0.5 * (target - mean) ** 2
    mu_sg = jax.lax.stop_gradient(mean)
    nll_term = 0.5 * ((target - mu_sg) ** 2 * jnp.exp(-logvar) + logvar)
    return jnp.sum(mse_term + nll_term, axis=-1)


def mse(mean, logvar, target):
    """Per-patch squared error sum_d (t-mu)^2; the variance head is not trained (spec §4)."""
    del logvar
    return jnp.sum((target - mean) ** 2, axis=-1)


def location_loss(loss_type: str, mean, logvar, target, weight_N, beta: float = 0.5):
    """The configured loss averaged over valid patches."""
    if loss_type == "beta_nll":
        per_patch = beta_nll(mean, logvar, target, beta)
    elif loss_type == "stirn":
        per_patch = stirn(mean, logvar, target)
    elif loss_type == "mse":
        per_patch = mse(mean, logvar, target)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}")
    return weighted_mean(per_patch, weight_N)
