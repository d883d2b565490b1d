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
comparison. The stem (conv -> BatchNorm -> ReLU -> max pool on a 14x14 map, the largest
activation of the network) runs in the fused form of `p2l.stem` under "auto": BatchNorm folded
into the conv through statistics computed from the input taps, pooling taken straight from the
patch, a custom backward; same variables, same function up to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from p2l import stem

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
        x = self.stem(x, train, mask)
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

    def stem(self, x, train: bool, mask=None):
        """conv1 -> bn1 -> ReLU -> max pool: 24x24 -> 14x14 -> 7x7 (call from a compact method).

        "auto" computes it in p2l.stem's fused form, "xla" layer by layer; both use the same
        variables (conv1/kernel, bn1/scale, bn1/bias, batch_stats bn1/mean and bn1/var), so
        checkpoints and the converter do not depend on the choice.
        """
        if self.conv_impl == "auto":
            return self._fused_stem(x, train, mask)
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
        return max_pool_3x3_s2(x)

    def _fused_stem(self, x, train: bool, mask):
        if x.shape[-1] != 1:
            raise ValueError(f"the fused stem takes single-channel patches, got {x.shape}")
        kernel = StemKernel(64, x.shape[-1], name="conv1")()
        bn = BatchNormState(64, name="bn1")
        kernel_9xC = kernel.reshape(-1, kernel.shape[-1])
        patches = x[..., 0]
        if train:
            valid = None if mask is None else mask.reshape(-1)
            mean, var = stem.batch_statistics(patches, kernel_9xC, valid)
            scale, bias, mean, var = bn(mean, var)
        else:
            scale, bias, mean, var = bn()
        folded_kernel, folded_bias = stem.fold_batch_norm(
            kernel_9xC, mean, var, scale, bias, BN_EPSILON
        )
        return stem.conv_relu_pool(
            patches.astype(self.dtype),
            folded_kernel.astype(self.dtype),
            folded_bias.astype(self.dtype),
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
