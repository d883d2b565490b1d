"""The denoising autoencoder's network: a U-Net over whole axial slices (Kascenas et al. 2022).

Slice (N, H, W, 1) -> reconstruction (N, H, W, 1). The network of their BraTS model
(AntanasKascenas/DenoisingAE `src/unet.py`, `UNet(depth=4, wf=6, norm="group", up_mode="upconv",
padding=True)`): `depth` levels of widths width * 2**i, two conv blocks per level, 2x2 average
pooling down, 2x2 stride-2 transposed convs up, skip concatenation (upsampled features first, as
theirs), a final plain 1x1 conv. Each block is theirs:

    reflection pad 1 -> weight-standardised conv3x3 -> Swish -> GroupNorm(norm_groups(c))

twice, the group count the median divisor of the width (8, 16, 16, 32 at widths 64-512). Every
conv has a bias and PyTorch's default initialisation. At depth 4 and width 64: 7,701,825
parameters (counted by hand in tests/dae_test.py).

The training step and inference are in `p2l.dae_step`, the volume scorer in `p2l.dae_scoring`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from p2l.errors import ConfigError
from p2l.heatmaps import positive_int
from p2l.layers import torch_default_bias_init, torch_default_kernel_init

# torch.nn.GroupNorm's default epsilon (Flax's is 1e-6).
GROUP_NORM_EPSILON = 1e-5
# Their weight standardisation adds this to the standard deviation (not to the variance).
WS_EPSILON = 1e-5
# PyTorch computes a transposed conv's fan-in from weight dimension 1, its *output* channels (its
# weight is (in, out, kh, kw)); Flax's kernel is (kh, kw, in, out), so fan-in is axis -1 here.
_torch_transpose_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2
)


def check_slice_shape(height: int, width: int, depth: int) -> None:
    """ConfigError unless the U-Net of `depth` levels can take (height, width) slices: each of
    its depth-1 poolings halves them, the way up must meet the skip connections' sizes, and the
    reflection padding needs at least 2 pixels at the lowest level (PyTorch refuses fewer)."""
    factor = 2 ** (depth - 1)
    if height % factor or width % factor or min(height, width) < 2 * factor:
        raise ConfigError(
            "dae.depth",
            f"a U-Net of depth {depth} pools {depth - 1} times, so slice height and width must "
            f"be multiples of {factor} and at least {2 * factor}; got {height}x{width}. Lower "
            "dae.depth or crop/pad data.image_shape",
        )


def norm_groups(channels: int) -> int:
    """Their GroupNorm group count: the median of the divisors of `channels` (the upper one of
    the two middle divisors when their number is even), e.g. 64 -> 8, 128 -> 16, 512 -> 32."""
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    return divisors[len(divisors) // 2]


def standardize_weight(kernel_HxWxIxO: jax.Array) -> jax.Array:
    """Weight standardisation as their `WNConv2d`: per output channel, minus the mean over
    (kh, kw, in), divided by the *unbiased* standard deviation (torch's `std`, n - 1) + 1e-5."""
    fan_in = kernel_HxWxIxO.shape[0] * kernel_HxWxIxO.shape[1] * kernel_HxWxIxO.shape[2]
    if fan_in < 2:
        raise ValueError(f"weight standardisation needs >= 2 weights per filter, got {fan_in}")
    centred = kernel_HxWxIxO - jnp.mean(kernel_HxWxIxO, axis=(0, 1, 2), keepdims=True)
    std = jnp.std(centred, axis=(0, 1, 2), keepdims=True, ddof=1)
    return centred / (std + WS_EPSILON)


class WSConv3x3(nn.Module):
    """Reflection padding 1, then a 3x3 convolution with a weight-standardised kernel. The
    variables are nn.Conv's ("kernel" (3, 3, in, out), "bias"): the stored kernel is the raw one,
    standardised at every call, so the optimiser updates the raw weights as theirs does."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", torch_default_kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param(
            "bias", torch_default_bias_init(9 * x.shape[-1]), (self.features,), jnp.float32
        )
        # Standardised in float32 before any cast to a lower compute dtype: the subtraction of
        # the mean would lose the small weights' precision otherwise.
        kernel = standardize_weight(kernel).astype(self.dtype)
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + bias.astype(self.dtype)


class ConvBlock(nn.Module):
    """(reflection pad -> WS conv3x3 -> Swish -> GroupNorm) x 2, as their UNetConvBlock."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = WSConv3x3(self.features, self.dtype, name=f"conv{i}")(x)
            x = nn.swish(x)
            x = nn.GroupNorm(
                num_groups=norm_groups(self.features),
                epsilon=GROUP_NORM_EPSILON,
                # Two-pass variance, as PyTorch and p2l.layers.batch_norm: E[x^2] - E[x]^2
                # cancels badly when |mean| >> std.
                use_fast_variance=False,
                dtype=self.dtype,
                name=f"norm{i}",
            )(x)
        return x


class DenoisingUNet(nn.Module):
    """Slices (N, H, W, 1) float -> reconstructions (N, H, W, 1) float32.

    H and W must be multiples of 2**(depth-1), at least 2**depth (ConfigError "dae.depth"
    otherwise). `dtype` is the compute dtype; parameters are float32.
    """

    depth: int = 4
    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        depth = positive_int(self.depth, "dae.depth")
        width = positive_int(self.width, "dae.width")
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(f"expected slices of shape (N, H, W, 1), got {x.shape}")
        check_slice_shape(x.shape[1], x.shape[2], depth)
        skips = []
        for level in range(depth):
            x = ConvBlock(width * 2**level, self.dtype, name=f"down{level}")(x)
            if level < depth - 1:
                skips.append(x)
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        for level in reversed(range(depth - 1)):
            features = width * 2**level
            x = nn.ConvTranspose(
                features,
                (2, 2),
                strides=(2, 2),
                padding="VALID",
                kernel_init=_torch_transpose_kernel_init,
                bias_init=torch_default_bias_init(4 * features),
                dtype=self.dtype,
                name=f"upconv{level}",
            )(x)
            x = jnp.concatenate([x, skips[level].astype(x.dtype)], axis=-1)
            x = ConvBlock(features, self.dtype, name=f"up{level}")(x)
        x = nn.Conv(
            1,
            (1, 1),
            kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(x.shape[-1]),
            dtype=self.dtype,
            name="last",
        )(x)
        return x.astype(jnp.float32)


def create_dae_model(config) -> DenoisingUNet:
    """The U-Net of `config.dae` (depth, width) computing in `config.model.dtype`.

    `dae.groups` is refused: the group count is their rule (`norm_groups`), and a run that
    still names it was trained with the earlier ReLU / max-pooling block, whose checkpoints have
    this network's variable shapes and would otherwise restore into it without an error."""
    if "groups" in config.dae:
        raise ConfigError(
            "dae.groups",
            "is no longer a setting: GroupNorm takes the median divisor of each width (their "
            "rule, p2l.dae_model.norm_groups). Delete the key; a checkpoint trained with it "
            "is of the earlier network and cannot be used",
        )
    return DenoisingUNet(
        depth=config.dae.depth, width=config.dae.width, dtype=jnp.dtype(config.model.dtype)
    )


@functools.lru_cache(maxsize=8)
def _compiled_init(model: DenoisingUNet):
    # The parameters do not depend on the slice size: they are built on the smallest slice the
    # U-Net takes (a 64-wide net on 192x192 would cost seconds). One compiled function rather
    # than op by op: XLA:CPU compiles the random initialisers per parameter shape, seconds each.
    side = 2**model.depth
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, side, side, 1), jnp.float32)))


def init_dae_variables(model: DenoisingUNet, key: jax.Array, height: int, width: int) -> dict:
    """{"params": ...} for (height, width) slices (GroupNorm keeps no batch statistics)."""
    check_slice_shape(height, width, positive_int(model.depth, "dae.depth"))
    return {"params": _compiled_init(model)(key)["params"]}
