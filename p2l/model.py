"""The Patch2Loc network (spec §3.1): ResNet-18 encoder, slice-position code, two MLP heads.

Parameter layout follows torchvision's names where it can (`conv1`, `bn1`, `layer1_0/conv1`, ...)
so that `p2l.convert_torch` maps a PyTorch state dict one to one. Total trainable parameters:
11,848,068 (encoder 11,167,680 + two heads of 340,194), as the reference.

Speed (issue "Performance"): XLA:CPU's convolution is very slow on the 2x2 and 1x1 feature maps of
the last two stages (see ../shared/bench/README.md), and its backward pass is slow whenever the
*output* map is that small (the 4x4 -> 2x2 stride-2 conv of layer3: ~0.5 s per 1024 patches for the
input gradient alone). On such tiny maps a zero-padded 3x3 convolution is *exactly* a matrix
product with a rearranged kernel: on a 1x1 map only the centre tap ever touches data, and each
output pixel of a 2x2 map reads a fixed set of taps. A 1x1 convolution is a strided subsampling
followed by a matrix product at any size. `Conv` below keeps the same `kernel` parameter as
`nn.Conv` and picks the formulation at trace time (shapes are static), so parameters,
checkpoints and results are unchanged; `conv_impl="xla"` keeps plain `lax.conv` everywhere for
comparison. The stem's max pool has the same forward as `nn.max_pool` and an explicit backward
that routes each window's gradient to its first maximum exactly like XLA's select-and-scatter,
which on CPU costs ~5x more than the whole pooled layer's forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# PyTorch BatchNorm: momentum 0.1 (weight of the new batch), eps 1e-5. Flax's `momentum` is the
# weight of the running average, so 0.9 (spec §3.1).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
STAGE_WIDTHS = (64, 128, 256, 512)
HEAD_WIDTHS = (512, 128, 64, 32)

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
    flat_kernel = kernel.reshape(k * k, cin, cout)
    # Append a zero tap for index -1 (padding) so one gather builds the whole matrix.
    flat_kernel = jnp.concatenate([flat_kernel, jnp.zeros((1, cin, cout), kernel.dtype)], axis=0)
    big = flat_kernel[np.where(taps < 0, k * k, taps)]  # (out_px, in_px, cin, cout)
    big = big.transpose(1, 2, 0, 3).reshape(h * w * cin, n_out * cout)
    y = x.reshape(n, h * w * cin) @ big
    out = int(math.isqrt(n_out))
    return y.reshape(n, out, out, cout)


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Exact 1x1 convolution without padding: subsample by `stride`, then one matrix product."""
    return x[:, ::stride, ::stride, :] @ kernel[0, 0]


class Conv(nn.Module):
    """A square conv with symmetric padding and no bias; parameter `kernel` is HWIO like nn.Conv.

    conv_impl: "auto" uses the exact matmul form when the output map is at most `matmul_max_out`
    pixels a side (where XLA:CPU's conv and its gradients are slow) and the pointwise form for
    unpadded 1x1 kernels; "xla" always uses lax.conv.
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
        if self.conv_impl not in ("auto", "xla"):
            raise ValueError(f"conv_impl must be 'auto' or 'xla', got {self.conv_impl!r}")
        h = x.shape[1]
        out = (h + 2 * self.padding - k) // self.stride + 1
        if self.conv_impl == "auto" and k == 1 and self.padding == 0:
            return pointwise_conv(x, kernel, self.stride)
        if self.conv_impl == "auto" and h == x.shape[2] and out <= self.matmul_max_out:
            return conv_as_matmul(x, kernel, self.stride, self.padding)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.stride, self.stride),
            padding=[(self.padding, self.padding)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def _max_pool_xla(x: jax.Array) -> jax.Array:
    """torchvision's stem pool: MaxPool2d(3, stride 2, padding 1), padding never selected."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (3, 3), (2, 2), padding 1)` with a cheaper, equivalent backward pass.

    Forward is the same reduce_window. The backward gives each window's cotangent to the first
    maximal element in row-major window order (padding is -inf, never selected), which is what
    XLA's select-and-scatter (select = `>=`) does for `nn.max_pool`'s gradient, written as nine
    masked, dilated pads that XLA fuses into one loop.
    """
    return _max_pool_xla(x)


def _max_pool_fwd(x):
    out = _max_pool_xla(x)
    return out, (x, out)


def _max_pool_bwd(residuals, g):
    x, out = residuals
    _, h, w, _ = x.shape
    oh, ow = out.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    taken = jnp.zeros(out.shape, bool)
    grad = jnp.zeros(padded.shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for ty in range(3):
        for tx in range(3):
            tap = padded[:, ty : ty + 2 * oh - 1 : 2, tx : tx + 2 * ow - 1 : 2, :]
            chosen = (tap == out) & ~taken
            taken = taken | chosen
            # Place window (i, j)'s share at padded pixel (2i + ty, 2j + tx): interior padding 1.
            config = (
                (0, 0, 0),
                (ty, h + 2 - ty - (2 * oh - 1), 1),
                (tx, w + 2 - tx - (2 * ow - 1), 1),
                (0, 0, 0),
            )
            grad = grad + jax.lax.pad(jnp.where(chosen, g, zero), zero, config)
    return (grad[:, 1 : h + 1, 1 : w + 1, :],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


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


class BasicBlock(nn.Module):
    """torchvision BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    features: int
    stride: int
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        conv = lambda f, k, s, p, name: Conv(  # noqa: E731
            f, k, s, p, conv_impl=self.conv_impl, dtype=self.dtype, name=name
        )
        h = conv(self.features, 3, self.stride, 1, "conv1")(x)
        h = nn.relu(batch_norm("bn1", train, self.dtype)(h, mask=mask))
        h = conv(self.features, 3, 1, 1, "conv2")(h)
        h = batch_norm("bn2", train, self.dtype)(h, mask=mask)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.stride, 0, "downsample_conv")(x)
            x = batch_norm("downsample_bn", train, self.dtype)(x, mask=mask)
        return nn.relu(h + x)


class Encoder(nn.Module):
    """ResNet-18 trunk; Patch2Loc stem conv1 = 3x3, stride 2, padding 3 (spec §3.1, §8.7)."""

    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        x = Conv(
            64,
            3,
            2,
            3,
            conv_impl=self.conv_impl,
            kernel_init=torch_default_kernel_init,
            dtype=self.dtype,
            name="conv1",
        )(x)
        x = nn.relu(batch_norm("bn1", train, self.dtype)(x, mask=mask))
        x = max_pool_3x3_s2(x) if self.conv_impl == "auto" else _max_pool_xla(x)
        for stage, width in enumerate(STAGE_WIDTHS):
            for block in range(2):
                stride = 2 if (stage > 0 and block == 0) else 1
                x = BasicBlock(
                    width,
                    stride,
                    conv_impl=self.conv_impl,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{block}",
                )(x, train, mask)
        return jnp.mean(x, axis=(1, 2))


class Head(nn.Module):
    """Linear(512,512)-BN-ReLU-...-Linear(32,2) (spec §3.1)."""

    out_dim: int = 2
    widths: Sequence[int] = HEAD_WIDTHS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, train: bool, mask=None):
        for i, width in enumerate(self.widths):
            z = self._linear(z, width, f"linear{i}")
            z = nn.relu(batch_norm(f"bn{i}", train, self.dtype)(z, mask=mask))
        return self._linear(z, self.out_dim, f"linear{len(self.widths)}")

    def _linear(self, z, width: int, name: str):
        fan_in = z.shape[-1]
        return nn.Dense(
            width,
            kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(fan_in),
            dtype=self.dtype,
            name=name,
        )(z)


def slice_position_encoding(position_N: jax.Array, dim: int = 512) -> jax.Array:
    """Sinusoidal code of the slice position (spec §3.1): even channels sin, odd channels cos."""
    freqs = jnp.exp(jnp.arange(0, dim, 2, dtype=jnp.float32) * (-math.log(10000.0) / dim))
    angle = position_N.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(-1, dim)


class Patch2Loc(nn.Module):
    """Patch (N, P, P, 1) and slice position (N,) in 0..100 -> location mean, log-variance (N, 2).

    detach_variance: the variance head sees stop_gradient(latent) (the "stirn" loss, spec §4).
    mask_N: optional (N,) validity weights; BatchNorm batch statistics use only patches with
    mask > 0, so the zero-weight padding slots of a static-shape batch do not change them.
    """

    latent_dim: int = 512
    detach_variance: bool = False
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches_NxPxPx1, position_N, train: bool = False, mask_N=None):
        conv_mask = bn_mask = None
        if mask_N is not None:
            valid = mask_N > 0
            conv_mask = valid[:, None, None, None]
            bn_mask = valid[:, None]
        latent = Encoder(self.conv_impl, self.dtype, name="encoder")(
            patches_NxPxPx1, train, conv_mask
        )
        latent = latent + slice_position_encoding(position_N, self.latent_dim).astype(latent.dtype)
        mean = Head(dtype=self.dtype, name="mean_head")(latent, train, bn_mask)
        var_input = jax.lax.stop_gradient(latent) if self.detach_variance else latent
        logvar = Head(dtype=self.dtype, name="logvar_head")(var_input, train, bn_mask)
        return mean.astype(jnp.float32), logvar.astype(jnp.float32)


def create_model(config) -> Patch2Loc:
    """The model a config describes (`config.model`)."""
    return Patch2Loc(
        detach_variance=config.loss.type == "stirn",
        conv_impl=config.model.conv_impl,
        dtype=jnp.dtype(config.model.dtype),
    )


def init_variables(model: Patch2Loc, key: jax.Array, patch_size: int) -> dict:
    """Parameters and batch statistics for a model taking `patch_size` patches."""
    patches = jnp.zeros((2, patch_size, patch_size, 1), jnp.float32)
    return model.init(key, patches, jnp.zeros((2,), jnp.float32), train=False)


def count_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
