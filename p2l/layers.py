"""Layers of the Patch2Loc network: initialisers, BatchNorm, convolutions and the stem's pool.

The PyTorch conventions the reference uses are fixed here (spec §3.1): BatchNorm momentum and
epsilon, torchvision's conv init, PyTorch's default Linear init, the stem's max pool. Parameter
names and shapes are those of `nn.Conv` / `nn.BatchNorm`, so checkpoints and
`p2l.tools.convert_torch` see the same variable tree whichever formulation runs.

`Conv` computes a zero-padded convolution exactly, in the form that suits XLA:CPU
(`conv_impl="matmul"`): on tiny maps (the 2x2 and 1x1 maps of the last stages) as matrix products
with a rearranged kernel, 1x1 kernels as subsampling plus a matrix product, otherwise `lax.conv`.
The choice is made at trace time from the static shapes; `conv_impl="xla"` keeps `lax.conv`
everywhere, and "auto" is one of the two by backend (`resolve_conv_impl`). `StemKernel` and
`BatchNormState` hold the stem's variables for its fused form (`p2l.stem`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# PyTorch BatchNorm: momentum 0.1 (weight of the new batch), eps 1e-5. Flax's `momentum` is the
# weight of the running average, so 0.9 (spec §3.1).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# How convolutions are computed: "matmul" the exact forms below that are fast on XLA:CPU (and
# p2l.stem's fused stem), "xla" plain lax.conv, "auto" one of them by backend (resolve_conv_impl).
CONV_IMPLS = ("auto", "matmul", "xla")
# jax_default_matmul_precision levels a config may name (`matmul_precision`, experiments/base.py).
MATMUL_PRECISIONS = ("default", "high", "highest")


def resolve_conv_impl(name: str, backend: str | None = None) -> str:
    """The form "auto" stands for on `backend` (default: JAX's default backend); other names
    unchanged. The CPU forms were measured only on XLA:CPU (README, "Performance"), where
    lax.conv collapses on 2x2 and 1x1 maps; on GPU and TPU nothing was measured, so "auto" keeps
    plain lax.conv there (cuDNN's and the TPU's convolutions have no such known weak spot)."""
    if name not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {', '.join(CONV_IMPLS)}, got {name!r}")
    if name != "auto":
        return name
    return "matmul" if (backend or jax.default_backend()) == "cpu" else "xla"


# PyTorch's default init for Linear and for the replaced stem conv: kaiming_uniform(a=sqrt(5)),
# i.e. U(+-1/sqrt(fan_in)) for weights, and bias U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torchvision ResNet trunk convs: kaiming_normal(mode="fan_out", nonlinearity="relu").
torchvision_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def _tiny_map_taps(size: int, stride: int, pad: int, k: int) -> np.ndarray:
    """Index table for a conv on a `size`x`size` map: taps[out, in] = kernel tap index or -1.

    Output pixel `o` (flattened) reads input pixel `i` through kernel tap `t` (flattened) when
    `o*stride - pad + t == i` along both axes; padding taps read zeros and are dropped.
    """
    out = (size + 2 * pad - k) // stride + 1
    taps = -np.ones((out * out, size * size), np.int64)
    for oy in range(out):
        for ox in range(out):
            for ty in range(k):
                for tx in range(k):
                    iy, ix = oy * stride - pad + ty, ox * stride - pad + tx
                    if 0 <= iy < size and 0 <= ix < size:
                        taps[oy * out + ox, iy * size + ix] = ty * k + tx
    return taps


def conv_as_matmul(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """Exact convolution of a small NHWC map as one matrix product (no padding taps computed).

    Builds W_big[(in_pixel, cin), (out_pixel, cout)] from the kernel with a static index table, so
    `x.reshape(N, HW*Cin) @ W_big` equals `lax.conv` with symmetric zero padding `pad`.
    """
    n, h, w, cin = x.shape
    k = kernel.shape[0]
    cout = kernel.shape[-1]
    assert h == w, "square maps only"
    taps = _tiny_map_taps(h, stride, pad, k)  # (out_pixels, in_pixels)
    n_out = taps.shape[0]
    connected = taps >= 0
    if connected.sum() <= SPARSE_TAPS_FRACTION * connected.size:
        return _conv_per_output_pixel(x, kernel, taps)
    flat_kernel = kernel.reshape(k * k, cin, cout)
    # Append a zero tap for index -1 (padding) so one gather builds the whole matrix.
    flat_kernel = jnp.concatenate([flat_kernel, jnp.zeros((1, cin, cout), kernel.dtype)], axis=0)
    big = flat_kernel[np.where(taps < 0, k * k, taps)]  # (out_px, in_px, cin, cout)
    big = big.transpose(1, 2, 0, 3).reshape(h * w * cin, n_out * cout)
    y = x.reshape(n, h * w * cin) @ big
    out = int(math.isqrt(n_out))
    return y.reshape(n, out, out, cout)


# Below this fraction of (output pixel, input pixel) pairs connected by a real tap, one small
# product per output pixel (only its real taps) beats the dense matrix of zero-padded taps. The
# 4x4 -> 2x2 stride-2 conv of layer3 connects 25 of 64 pairs: 2.6x fewer multiply-adds.
SPARSE_TAPS_FRACTION = 0.75


def _conv_per_output_pixel(x: jax.Array, kernel: jax.Array, taps: np.ndarray) -> jax.Array:
    """conv_as_matmul with one product per output pixel over the input pixels it really reads."""
    n, h, w, cin = x.shape
    k = kernel.shape[0]
    flat_x = x.reshape(n, h * w, cin)
    flat_kernel = kernel.reshape(k * k, cin, -1)
    outs = []
    for row in taps:
        pixels = np.flatnonzero(row >= 0)
        # The input pixels this output reads, flattened with their channels: (n, taps * cin).
        gathered = flat_x[:, pixels, :].reshape(n, -1)
        weights = flat_kernel[row[pixels]].reshape(len(pixels) * cin, -1)
        outs.append(gathered @ weights)
    out = int(math.isqrt(taps.shape[0]))
    return jnp.stack(outs, axis=1).reshape(n, out, out, -1)


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Exact 1x1 convolution without padding: subsample by `stride`, then one matrix product."""
    return x[:, ::stride, ::stride, :] @ kernel[0, 0]


class Conv(nn.Module):
    """A square conv with symmetric padding and no bias; parameter `kernel` is HWIO like nn.Conv.

    conv_impl: "matmul" uses the exact matmul form when the output map is at most
    `matmul_max_out` pixels a side (where XLA:CPU's conv and its gradients are slow) and the
    pointwise form for unpadded 1x1 kernels; "xla" always uses lax.conv; "auto" as
    `resolve_conv_impl`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    conv_impl: str = "auto"
    matmul_max_out: int = 2
    kernel_init: Any = torchvision_conv_init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        kernel = kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        impl = resolve_conv_impl(self.conv_impl)
        h = x.shape[1]
        out = (h + 2 * self.padding - k) // self.stride + 1
        if impl == "matmul" and k == 1 and self.padding == 0:
            return pointwise_conv(x, kernel, self.stride)
        if impl == "matmul" and h == x.shape[2] and out <= self.matmul_max_out:
            return conv_as_matmul(x, kernel, self.stride, self.padding)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.stride, self.stride),
            padding=[(self.padding, self.padding)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torchvision's stem pool: MaxPool2d(3, stride 2, padding 1), padding never selected."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def batch_norm(name: str, train: bool, dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        # Two-pass variance, as PyTorch: E[x^2]-E[x]^2 cancels badly when |mean| >> std, and
        # made the 1- and 8-device steps differ at the 1e-3 level.
        use_fast_variance=False,
        dtype=dtype,
        name=name,
    )


class StemKernel(nn.Module):
    """The stem conv's `kernel` parameter (HWIO, as nn.Conv / Conv) for the fused stem."""

    features: int
    in_features: int

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (3, 3, self.in_features, self.features)
        return self.param("kernel", torch_default_kernel_init, shape)


class BatchNormState(nn.Module):
    """nn.BatchNorm's variables without its arithmetic, for a BatchNorm folded into a conv.

    Called with this batch's (mean, var), it updates the running averages exactly as nn.BatchNorm
    (momentum BN_MOMENTUM, not while initialising) and returns them; called without, it returns
    the running statistics (eval mode). Returns (scale, bias, mean, var).
    """

    features: int

    @nn.compact
    def __call__(self, batch_mean=None, batch_var=None):
        shape = (self.features,)
        scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
        if batch_mean is None:
            return scale, bias, ra_mean.value, ra_var.value
        if not self.is_initializing():
            ra_mean.value = BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * batch_mean
            ra_var.value = BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * batch_var
        return scale, bias, batch_mean, batch_var
