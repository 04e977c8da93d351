"""LlamaGen VQ-16 encoder and decoder (Janus-Pro's `gen_vision_model`), exactly as published.

Why a separate family from `vq.py`'s `conv`: that one trades fidelity to the reference for CPU speed
(space-to-depth resampling, one res block, no attention). This one reproduces LlamaGen's
`VQ_models["VQ-16"]` so Janus-Pro weights load one-to-one (`sgt_jax/convert/janus.py`):
- channels `width` x `channel_mult` (1, 1, 2, 2, 4); `num_res_blocks` res blocks per encoder level,
  one more per decoder level; GroupNorm(32, eps 1e-6) + swish;
- attention blocks (GroupNorm, 1x1 q/k/v/proj convs, one head over all pixels) after every res block
  of the lowest level, and in the mid block (res, attn, res);
- downsampling pads (0, 1, 0, 1) then a stride-2 3x3 conv with no padding; upsampling is nearest x2
  then a 3x3 conv;
- `quant_conv` z_channels -> code_dim at the end of the encoder, `post_quant_conv` code_dim ->
  z_channels at the start of the decoder. The l2-normalised codebook is `vq.Quantizer`'s.
Images are NHWC in [-1, 1]. The VQ trainer trains this family like the others (`family="llamagen"`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _conv(features: int, kernel: int, dtype, name: str, *, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            (None, None, "conv_in", "conv_out")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def _norm(dtype, name: str) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6) with affine parameters, as LlamaGen's `Normalize`."""
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


class ResnetBlock(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _conv(self.features, 3, self.dtype, "conv1")(nn.swish(_norm(self.dtype, "norm1")(x)))
        h = _conv(self.features, 3, self.dtype, "conv2")(nn.swish(_norm(self.dtype, "norm2")(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.dtype, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head attention over all pixels with 1x1-conv projections (softmax in float32)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        h = _norm(self.dtype, "norm")(x)
        q, k, v = (_conv(c, 1, self.dtype, n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
        return x + _conv(c, 1, self.dtype, "proj_out")(out.reshape(b, hgt, wid, c))


class MidBlock(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        x = ResnetBlock(c, self.dtype, name="block_1")(x)
        x = AttnBlock(self.dtype, name="attn_1")(x)
        return ResnetBlock(c, self.dtype, name="block_2")(x)


class Encoder(nn.Module):
    """images [B, H, W, 3] -> pre-quantisation latents [B, H/f, W/f, code_dim] (quant_conv included)."""

    spec: Any  # vq.VQSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        s, dt = self.spec, self.dtype
        x = _conv(s.width, 3, dt, "conv_in")(images.astype(dt))
        last = len(s.channel_mult) - 1
        for level, mult in enumerate(s.channel_mult):
            for i in range(s.num_res_blocks):
                x = ResnetBlock(s.width * mult, dt, name=f"down_{level}_block_{i}")(x)
                if level == last:
                    x = AttnBlock(dt, name=f"down_{level}_attn_{i}")(x)
            if level != last:
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # torch F.pad (0, 1, 0, 1): right and bottom
                x = _conv(x.shape[-1], 3, dt, f"down_{level}_downsample", stride=2, padding="VALID")(x)
        x = MidBlock(dt, name="mid")(x)
        x = nn.swish(_norm(dt, "norm_out")(x))
        x = _conv(s.z_channels, 3, dt, "conv_out")(x)
        return _conv(s.code_dim, 1, dt, "quant_conv")(x)


class Decoder(nn.Module):
    """quantised codes [B, h, w, code_dim] -> images [B, h*f, w*f, 3] float32 (post_quant_conv included)."""

    spec: Any  # vq.VQSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, zq: Array) -> Array:
        s, dt = self.spec, self.dtype
        x = _conv(s.z_channels, 1, dt, "post_quant_conv")(zq.astype(dt))
        mults = tuple(s.channel_mult)[::-1]
        x = _conv(s.width * mults[0], 3, dt, "conv_in")(x)
        x = MidBlock(dt, name="mid")(x)
        for level, mult in enumerate(mults):  # level 0 = lowest resolution (LlamaGen's conv_blocks order)
            for i in range(s.num_res_blocks + 1):
                x = ResnetBlock(s.width * mult, dt, name=f"up_{level}_block_{i}")(x)
                if level == 0:
                    x = AttnBlock(dt, name=f"up_{level}_attn_{i}")(x)
            if level != len(mults) - 1:
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
                x = _conv(c, 3, dt, f"up_{level}_upsample")(x)
        x = nn.swish(_norm(dt, "norm_out")(x))
        return _conv(3, 3, dt, "conv_out")(x).astype(jnp.float32)
