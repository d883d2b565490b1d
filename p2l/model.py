"""The Patch2Loc network (spec §3.1): ResNet-18 encoder, slice-position code, two MLP heads.

Patch (N, P, P, 1) -> encoder -> 512-d latent + sinusoidal code of the slice position -> mean
head and log-variance head, each (N, 2). Parameter names follow torchvision's where they can
(`conv1`, `bn1`, `layer1_0/conv1`, ...), so `p2l.tools.convert_torch` maps a PyTorch state dict
one to one. Trainable parameters: 11,848,068 (encoder 11,167,680 + two heads of 340,194), as the
reference. The layers themselves (initialisers, BatchNorm, the convolution forms) are in
`p2l.layers`; the stem's fused form is in `p2l.stem`.
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
from p2l.layers import (
    BN_EPSILON,
    BatchNormState,
    Conv,
    StemKernel,
    batch_norm,
    max_pool_3x3_s2,
    resolve_conv_impl,
    torch_default_bias_init,
    torch_default_kernel_init,
)

STAGE_WIDTHS = (64, 128, 256, 512)
HEAD_WIDTHS = (512, 128, 64, 32)


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

        "matmul" computes it in p2l.stem's fused form, "xla" layer by layer ("auto": one of them
        by backend); both use the same variables (conv1/kernel, bn1/scale, bn1/bias, batch_stats
        bn1/mean and bn1/var), so checkpoints and the converter do not depend on the choice.
        """
        if resolve_conv_impl(self.conv_impl) == "matmul":
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
    matmul_precision: jax_default_matmul_precision of every product and convolution traced in
    the forward (the backward's transposes inherit it), wherever the model is applied: training,
    evaluation and detection all build it with `create_model`. None: JAX's global setting. (The
    fused stem's custom backward is traced outside; its only products form the gradient of the
    input patches, which training never uses.)
    """

    latent_dim: int = 512
    detach_variance: bool = False
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    matmul_precision: str | None = None

    def __call__(self, patches_NxPxPx1, position_N, train: bool = False, mask_N=None):
        if self.matmul_precision is None:
            return self._forward(patches_NxPxPx1, position_N, train, mask_N)
        with jax.default_matmul_precision(self.matmul_precision):
            return self._forward(patches_NxPxPx1, position_N, train, mask_N)

    @nn.compact
    def _forward(self, patches_NxPxPx1, position_N, train: bool, mask_N):
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
    """The model a config describes (`config.model`, `config.matmul_precision`), its conv_impl
    resolved for this backend (run_info.json records the same resolution)."""
    return Patch2Loc(
        detach_variance=config.loss.type == "stirn",
        conv_impl=resolve_conv_impl(config.model.conv_impl),
        dtype=jnp.dtype(config.model.dtype),
        # Configs of runs from before the key (read back from run_info.json) ran at JAX's default.
        matmul_precision=config.get("matmul_precision", "default"),
    )


def init_variables(model: Patch2Loc, key: jax.Array, patch_size: int) -> dict:
    """Parameters and batch statistics for a model taking `patch_size` patches."""
    patches = jnp.zeros((2, patch_size, patch_size, 1), jnp.float32)
    return model.init(key, patches, jnp.zeros((2,), jnp.float32), train=False)


def count_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
