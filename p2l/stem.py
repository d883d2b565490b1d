"""The network's stem, conv 3x3/s2/pad 3 -> BatchNorm -> ReLU -> max pool 3/s2/pad 1, fused.

Why: on a 24x24 patch the stem's output is a 14x14x64 map, 51 MB per 1024 patches, four times
the size of any later activation. The conv (one input channel), the train-mode BatchNorm passes,
the max pool and their backward passes over that map take a large share of a CPU training step
although the arithmetic is tiny. The fused form never materialises the 14x14 map and is the same
function (spec §3.1's layers, equal up to float32 rounding; `conv_impl="xla"` keeps the
layer-by-layer form):

1. BatchNorm folds into the conv. The conv is linear in the 9 taps of each output's 3x3 input
   window, so the batch statistics of its output follow exactly from the taps' mean `mu` and
   (centred, biased) covariance `C` over all N x 14 x 14 outputs: mean_c = mu . w_c and
   var_c = w_c^T C w_c, the two-pass biased statistics Flax and PyTorch compute. The normalised
   output is then a conv with kernel w_c * k_c and bias b_c - mean_c * k_c,
   k_c = scale_c / sqrt(var_c + eps). In eval mode the running statistics fold the same way.
2. ReLU commutes with max, and each pooled output reads 3x3 stem outputs at stride 2, each of
   which reads 3x3 input pixels at stride 2: pooled[i, j] = relu(max over the 9 window positions
   of the 9-tap sum), one elementwise pass over 7x7 outputs with the taps read straight from the
   (padded) patch. Window positions in the pool's padding (stem row or column -1) are excluded,
   as max pooling's -inf padding never wins.
3. The backward pass (custom VJP) routes each pooled output's gradient to the first maximum of
   its window in row-major order, as PyTorch's and XLA's max-pool gradient do, and forms the
   kernel gradient as sums over the selected taps, again without the 14x14 map.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KERNEL = 3  # stem conv 3x3, stride 2, padding 3; pool 3x3, stride 2, padding 1 (spec §3.1, §8.7)
CONV_STRIDE = 2
CONV_PAD = 3
POOL_STRIDE = 2
POOL_PAD = 1
# Input offsets: pooled row i reads stem rows 2i-1+a (a = 0..2), which read padded-input rows
# 2(2i-1+a)+ty = 4i + 2a + ty - 2 (ty = 0..2). Padding the patch by CONV_PAD + 2 on the low side
# makes that index 4i + r with r = 2a + ty in 0..6.
_STEP = CONV_STRIDE * POOL_STRIDE
_LOW_PAD = CONV_PAD + CONV_STRIDE * POOL_PAD
_OFFSETS = CONV_STRIDE * (KERNEL - 1) + KERNEL  # r = 2a + ty in 0..6


def output_size(patch: int) -> tuple[int, int]:
    """(stem conv output side, pooled side) for a square patch side."""
    conv = (patch + 2 * CONV_PAD - KERNEL) // CONV_STRIDE + 1
    pooled = (conv + 2 * POOL_PAD - KERNEL) // POOL_STRIDE + 1
    return conv, pooled


def conv_taps(x_NxHxW: jax.Array) -> jax.Array:
    """(N, conv_side, conv_side, 9): the 9 zero-padded input taps of every stem conv output."""
    n, h, _ = x_NxHxW.shape
    conv, _ = output_size(h)
    xp = jnp.pad(x_NxHxW, ((0, 0), (CONV_PAD, CONV_PAD), (CONV_PAD, CONV_PAD)))
    span = CONV_STRIDE * (conv - 1) + 1
    taps = [
        xp[:, ty : ty + span : CONV_STRIDE, tx : tx + span : CONV_STRIDE]
        for ty in range(KERNEL)
        for tx in range(KERNEL)
    ]
    return jnp.stack(taps, axis=-1)


def tap_statistics(x_NxHxW: jax.Array, valid_N: jax.Array | None = None):
    """Mean (9,) and centred biased covariance (9, 9) of the conv taps over patches and outputs.

    valid_N: optional (N,) bool; only those patches count (the masked BatchNorm of p2l.model).
    """
    # At least float32, as Flax's BatchNorm statistics.
    dtype = jnp.promote_types(x_NxHxW.dtype, jnp.float32)
    taps = conv_taps(x_NxHxW.astype(dtype))
    n = taps.shape[0]
    rows = taps.reshape(n, -1, taps.shape[-1])
    if valid_N is None:
        weight = jnp.ones((n,), dtype)
    else:
        weight = valid_N.astype(dtype)
    count = jnp.sum(weight) * rows.shape[1]
    mu = jnp.einsum("n,nkt->t", weight, rows) / count
    centred = (rows - mu) * jnp.sqrt(weight)[:, None, None]
    flat = centred.reshape(-1, centred.shape[-1])
    cov = (flat.T @ flat) / count
    return mu, cov


def batch_statistics(x_NxHxW, kernel_9xC, valid_N=None):
    """The stem conv output's per-channel batch mean and biased variance, from the input alone."""
    mu, cov = tap_statistics(x_NxHxW, valid_N)
    kernel = kernel_9xC.astype(mu.dtype)
    mean = mu @ kernel
    var = jnp.maximum(jnp.sum((cov @ kernel) * kernel, axis=0), 0.0)
    return mean, var


def fold_batch_norm(kernel_9xC, mean, var, scale, bias, epsilon):
    """Kernel and bias of conv -> BatchNorm(mean, var, scale, bias) as one affine conv."""
    k = scale * jax.lax.rsqrt(var + epsilon)
    return kernel_9xC * k, bias - mean * k


def _window_inputs(x_NxHxW: jax.Array):
    """S[r][s] = padded patch at rows 4i + r, cols 4j + s for every pooled (i, j): (N, P, P)."""
    n, h, _ = x_NxHxW.shape
    conv, pooled = output_size(h)
    # Highest row read: _STEP*(pooled-1) + _OFFSETS - 1; pad the high side up to it.
    high = _STEP * (pooled - 1) + _OFFSETS - (h + _LOW_PAD)
    xq = jnp.pad(x_NxHxW, ((0, 0), (_LOW_PAD, max(high, 0)), (_LOW_PAD, max(high, 0))))
    span = _STEP * (pooled - 1) + 1
    return [
        [xq[:, r : r + span : _STEP, s : s + span : _STEP] for s in range(_OFFSETS)]
        for r in range(_OFFSETS)
    ], xq.shape


def _window_valid(pooled: int, conv: int, a: int) -> jax.Array:
    """(pooled,) bool: pooled row i's window position a is a real stem row (not pool padding)."""
    rows = POOL_STRIDE * jnp.arange(pooled) - POOL_PAD + a
    return (rows >= 0) & (rows < conv)


def _candidates(s, kernel_9xC, bias_C, pooled: int, conv: int):
    """The 9 window positions' pre-activations (N, P, P, C), invalid positions at -inf."""
    out = []
    for a in range(KERNEL):
        row_ok = _window_valid(pooled, conv, a)[:, None, None]
        for b in range(KERNEL):
            col_ok = _window_valid(pooled, conv, b)[None, :, None]
            z = bias_C
            for ty in range(KERNEL):
                for tx in range(KERNEL):
                    tap = s[2 * a + ty][2 * b + tx][..., None]
                    z = z + tap * kernel_9xC[ty * KERNEL + tx]
            out.append(jnp.where(row_ok & col_ok, z, -jnp.inf))
    return out


@jax.custom_vjp
def conv_relu_pool(x_NxHxW, kernel_9xC, bias_C):
    """relu(maxpool(conv(x, kernel) + bias)) with the stem's geometry, never forming the conv map.

    x: (N, H, W) single-channel patches; kernel: (9, C) row-major 3x3 taps; returns (N, P, P, C).
    """
    return _forward(x_NxHxW, kernel_9xC, bias_C)


def _forward(x, kernel, bias):
    conv, pooled = output_size(x.shape[1])
    s, _ = _window_inputs(x)
    return jax.nn.relu(functools.reduce(jnp.maximum, _candidates(s, kernel, bias, pooled, conv)))


def _fwd(x, kernel, bias):
    return conv_relu_pool(x, kernel, bias), (x, kernel, bias)


def _bwd(residuals, g):
    x, kernel, bias = residuals
    conv, pooled = output_size(x.shape[1])
    s, padded_shape = _window_inputs(x)
    cands = _candidates(s, kernel, bias, pooled, conv)
    n_positions = len(cands)
    zmax = functools.reduce(jnp.maximum, cands)
    zero = jnp.zeros((), g.dtype)
    g = jnp.where(zmax > 0, g, zero)  # relu'(0) = 0, as jax.nn.relu
    # Index of the first maximum in row-major window order (PyTorch's / XLA's routing of ties).
    first = jnp.full(zmax.shape, n_positions - 1, jnp.int32)
    for ab in reversed(range(n_positions - 1)):
        first = jnp.where(cands[ab] == zmax, ab, first)
    # Kernel gradient: for each tap, g times the input pixel the tap reads at the selected window
    # position, summed over patches and outputs; bias gradient: the sum of g. The ten sums are one
    # variadic reduction, so XLA computes the window maxima and `first` once per element. As ten
    # reductions, XLA:CPU fused that 81-tap recomputation into each of them (no way found to make
    # it keep `first` in memory: optimization barriers are removed before fusion), ~25% slower.
    terms = [g]
    for ty in range(KERNEL):
        for tx in range(KERNEL):
            selected = zero
            for ab in range(n_positions):
                a, b = divmod(ab, KERNEL)
                selected = jnp.where(first == ab, s[2 * a + ty][2 * b + tx][..., None], selected)
            terms.append(g * selected)
    # Over the map first, then over patches: the (N, C) partial sums are cheap, and XLA:CPU runs
    # the reduction over the map in parallel over patches.
    sums = jax.lax.reduce(
        tuple(terms),
        tuple(zero for _ in terms),
        lambda xs, ys: tuple(x + y for x, y in zip(xs, ys, strict=True)),
        (1, 2),
    )
    grad_bias = jnp.sum(sums[0], axis=0)
    grad_kernel = jnp.stack([jnp.sum(t, axis=0) for t in sums[1:]])
    routed = [jnp.where(first == ab, g, zero) for ab in range(n_positions)]
    # Input gradient (not needed to train, where the patches are data; XLA drops it then).
    grad_xq = jnp.zeros(padded_shape, g.dtype)
    for r in range(_OFFSETS):
        for c in range(_OFFSETS):
            acc = None
            for ab, gab in enumerate(routed):
                a, b = divmod(ab, KERNEL)
                ty, tx = r - 2 * a, c - 2 * b
                if 0 <= ty < KERNEL and 0 <= tx < KERNEL:
                    term = gab @ kernel[ty * KERNEL + tx]
                    acc = term if acc is None else acc + term
            if acc is None:
                continue
            # Place pooled (i, j)'s share at padded pixel (4i + r, 4j + c): interior padding 3.
            config = (
                (0, 0, 0),
                (r, padded_shape[1] - r - (_STEP * (pooled - 1) + 1), _STEP - 1),
                (c, padded_shape[2] - c - (_STEP * (pooled - 1) + 1), _STEP - 1),
            )
            grad_xq = grad_xq + jax.lax.pad(acc, zero, config)
    h, w = x.shape[1:]
    grad_x = grad_xq[:, _LOW_PAD : _LOW_PAD + h, _LOW_PAD : _LOW_PAD + w]
    return grad_x, grad_kernel.astype(kernel.dtype), grad_bias.astype(bias.dtype)


conv_relu_pool.defvjp(_fwd, _bwd)
