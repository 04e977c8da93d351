"""VQ image tokenizer: encoder -> l2-normalised low-dimensional codebook -> decoder (Flax Linen).

One quantiser, three encoder/decoder families chosen by `cfg.model.vq.family`:
- `vit`: a patch transformer (ViT-VQGAN / UViM style). Cheap on CPU and global from layer one, which
  lets the decoder place sharp mask edges from the context of neighbouring codes.
- `conv`: a LlamaGen / taming style conv net (resnet blocks, channel multipliers). Resampling uses
  space-to-depth + conv and nearest-resize + conv only: on XLA:CPU the input gradient of strided
  convolutions and ConvTranspose is ~20x slower than a stride-1 conv.
- `llamagen`: LlamaGen's VQ-16 exactly as published (Janus-Pro's generation tokenizer), in
  `llamagen_vq.py`, so converted Janus-Pro weights run unchanged.

The quantiser follows LlamaGen: encoder outputs and codes live on the unit sphere of a small
(8-16 dim) space, nearest code = highest cosine similarity, straight-through gradients, codebook +
beta * commitment losses. Codebook collapse (the usual failure on small custom data) is countered
by `reinit_dead_codes`, which the VQ training stage runs in-graph after each update.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgt_jax.config import ConfigError

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class VQSpec:
    """Hashable view of `cfg.model.vq` (+ image size) so the module can be a jit-static value."""

    family: str = "vit"
    image_size: int = 64
    codebook_size: int = 1024
    code_dim: int = 8
    downsample: int = 8
    width: int = 128
    depth: int = 2
    decoder_depth: int = 0  # 0 = same as depth
    num_heads: int = 4
    mlp_ratio: int = 4
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    refine_channels: int = 0  # vit only: a full-resolution 3x3 conv head after the patch decoder
    z_channels: int = 256  # llamagen only: latent channels around quant_conv / post_quant_conv
    beta: float = 0.25

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_codes(self) -> int:
        return self.grid * self.grid


def spec_from_config(cfg) -> VQSpec:
    """Build the spec from a validated experiment config (reads `model.vq` and `data.image_size`)."""
    v = cfg.model.vq
    return VQSpec(
        family=v.family, image_size=int(cfg.data.image_size), codebook_size=int(v.codebook_size),
        code_dim=int(v.code_dim), downsample=int(v.downsample), width=int(v.width), depth=int(v.depth),
        decoder_depth=int(v.decoder_depth), num_heads=int(v.num_heads), mlp_ratio=int(v.mlp_ratio),
        channel_mult=tuple(int(m) for m in v.channel_mult), num_res_blocks=int(v.num_res_blocks),
        refine_channels=int(v.refine_channels), z_channels=int(v.z_channels), beta=float(v.beta))


def check_config(cfg) -> None:
    """Rules of `model.vq` (listed in sgt_jax/checks.py): what the chosen family can build."""
    v = cfg.model.vq

    def fail(path, value, allowed):
        raise ConfigError(f"config field '{path}' = {value!r} is not allowed; allowed: {allowed}")

    if float(v.gan_weight) > 0:
        fail("model.vq.gan_weight", v.gan_weight, "0.0 (the patch-GAN loss is not implemented)")
    if v.family in ("conv", "llamagen"):
        levels = int(round(math.log2(v.downsample)))
        if 2 ** levels != v.downsample or len(v.channel_mult) != levels + 1:
            fail("model.vq.channel_mult", tuple(v.channel_mult),
                 f"log2(downsample)+1 = {levels + 1} entries for the {v.family} family with downsample={v.downsample}")
        if v.family == "llamagen":
            bad = [v.width * m for m in v.channel_mult if (v.width * m) % 32] + \
                ([v.z_channels] if v.z_channels % 32 else [])
            if bad:
                fail("model.vq.width/channel_mult/z_channels", (v.width, tuple(v.channel_mult), v.z_channels),
                     f"widths and z_channels that are multiples of 32 (GroupNorm(32)); not: {bad}")
    elif v.width % v.num_heads:
        fail("model.vq.num_heads", v.num_heads, f"a divisor of model.vq.width ({v.width})")


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def space_to_depth(x: Array, p: int) -> Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C] (pixel order inside a patch: row, column, channel)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: Array, p: int) -> Array:
    """Inverse of `space_to_depth`."""
    b, h, w, cpp = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def _dense(features: int, axes: tuple[str, str], dtype, name: str | None = None, zero: bool = False) -> nn.Dense:
    init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def _norm(dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(dtype=dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def _conv(features: int, kernel: int, dtype, name: str | None = None, zero: bool = False) -> nn.Conv:
    init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
    return nn.Conv(features, (kernel, kernel), padding="SAME", dtype=dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(init, (None, None, "conv_in", "conv_out")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def _group_norm(channels: int, dtype, name: str | None = None) -> nn.GroupNorm:
    groups = math.gcd(32, channels)
    return nn.GroupNorm(num_groups=groups, dtype=dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


# ---------------------------------------------------------------------------------------------
# vit family
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with explicit [embed, heads, kv] kernels (3-D logical axis names)."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        hd = d // self.num_heads
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))

        def proj(name):
            w = self.param(f"{name}_kernel", nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                           (d, self.num_heads, hd))
            b = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv")),
                           (self.num_heads, hd))
            return jnp.einsum("bnd,dhk->bnhk", x, w.astype(self.dtype)) + b.astype(self.dtype)

        y = jax.nn.dot_product_attention(proj("query"), proj("key"), proj("value"))
        w_out = self.param("out_kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")), (self.num_heads, hd, d))
        b_out = self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (d,))
        return jnp.einsum("bnhk,hkd->bnd", y, w_out.astype(self.dtype)) + b_out.astype(self.dtype)


class Block(nn.Module):
    """Pre-norm transformer block (bidirectional)."""

    num_heads: int
    mlp_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        x = x + Attention(self.num_heads, self.dtype, name="attn")(_norm(self.dtype, "norm1")(x))
        h = _dense(d * self.mlp_ratio, ("embed", "mlp"), self.dtype, "mlp_in")(_norm(self.dtype, "norm2")(x))
        h = nn.gelu(h)
        return x + _dense(d, ("mlp", "embed"), self.dtype, "mlp_out")(h)


class _Tokens(nn.Module):
    """Learned position embedding + transformer stack + final norm, on [B, N, D] tokens."""

    depth: int
    num_heads: int
    mlp_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "length", "embed")), (1,) + x.shape[1:])
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, self.dtype, name=f"block{i}")(x)
        return _norm(self.dtype, "norm_out")(x)


class ViTEncoder(nn.Module):
    spec: VQSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        s = self.spec
        x = space_to_depth(images.astype(self.dtype), s.downsample)
        b, h, w, c = x.shape
        x = _dense(s.width, ("conv_in", "embed"), self.dtype, "patch_embed")(x.reshape(b, h * w, c))
        x = _Tokens(s.depth, s.num_heads, s.mlp_ratio, self.dtype, name="tokens")(x)
        z = _dense(s.code_dim, ("embed", "code_dim"), self.dtype, "to_code")(x)
        return z.reshape(b, h, w, s.code_dim)


class ViTDecoder(nn.Module):
    spec: VQSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, zq: Array) -> Array:
        s = self.spec
        b, h, w, d = zq.shape
        x = _dense(s.width, ("code_dim", "embed"), self.dtype, "from_code")(zq.reshape(b, h * w, d).astype(self.dtype))
        x = _Tokens(s.decoder_depth or s.depth, s.num_heads, s.mlp_ratio, self.dtype, name="tokens")(x)
        p = s.downsample
        if s.refine_channels:
            # Patch features at full resolution, then two stride-1 3x3 convs that see across patch seams.
            f = _dense(p * p * s.refine_channels, ("embed", "conv_out"), self.dtype, "to_pixels")(x)
            f = depth_to_space(f.reshape(b, h, w, -1), p)
            f = _conv(s.refine_channels, 3, self.dtype, "refine1")(nn.gelu(f))
            out = _conv(3, 3, self.dtype, "refine_out")(nn.gelu(f))
        else:
            out = _dense(p * p * 3, ("embed", "conv_out"), self.dtype, "to_pixels")(x)
            out = depth_to_space(out.reshape(b, h, w, -1), p)
        return out.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# conv family
# ---------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _conv(self.features, 3, self.dtype, "conv1")(nn.swish(_group_norm(x.shape[-1], self.dtype, "norm1")(x)))
        h = _conv(self.features, 3, self.dtype, "conv2")(nn.swish(_group_norm(self.features, self.dtype, "norm2")(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.dtype, "skip")(x)
        return x + h


class ConvEncoder(nn.Module):
    spec: VQSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        s = self.spec
        x = _conv(s.width * s.channel_mult[0], 3, self.dtype, "conv_in")(images.astype(self.dtype))
        for level, mult in enumerate(s.channel_mult):
            for r in range(s.num_res_blocks):
                x = ResBlock(s.width * mult, self.dtype, name=f"down{level}_res{r}")(x)
            if level < len(s.channel_mult) - 1:
                # Downsample by 2: space-to-depth then a stride-1 conv (fast input grads on CPU).
                x = _conv(s.width * mult, 3, self.dtype, f"down{level}_resample")(space_to_depth(x, 2))
        x = ResBlock(x.shape[-1], self.dtype, name="mid_res")(x)
        x = nn.swish(_group_norm(x.shape[-1], self.dtype, "norm_out")(x))
        return _conv(s.code_dim, 1, self.dtype, "to_code")(x)


class ConvDecoder(nn.Module):
    spec: VQSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, zq: Array) -> Array:
        s = self.spec
        mults = s.channel_mult[::-1]
        x = _conv(s.width * mults[0], 3, self.dtype, "conv_in")(zq.astype(self.dtype))
        x = ResBlock(x.shape[-1], self.dtype, name="mid_res")(x)
        for level, mult in enumerate(mults):
            for r in range(s.num_res_blocks):
                x = ResBlock(s.width * mult, self.dtype, name=f"up{level}_res{r}")(x)
            if level < len(mults) - 1:
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
                x = _conv(c, 3, self.dtype, f"up{level}_resample")(x)
        x = nn.swish(_group_norm(x.shape[-1], self.dtype, "norm_out")(x))
        return _conv(3, 3, self.dtype, "conv_out")(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# quantiser
# ---------------------------------------------------------------------------------------------
class Quantizer(nn.Module):
    """Nearest l2-normalised code with a straight-through estimator (LlamaGen style)."""

    codebook_size: int
    code_dim: int

    def setup(self):
        def init(key, shape, dtype=jnp.float32):
            return l2_normalize(jax.random.normal(key, shape, dtype))

        self.codebook = self.param("codebook", nn.with_logical_partitioning(init, ("codebook", "code_dim")),
                                   (self.codebook_size, self.code_dim))

    def normalized_codebook(self) -> Array:
        return l2_normalize(self.codebook)

    def lookup(self, codes: Array) -> Array:
        return jnp.take(self.normalized_codebook(), codes, axis=0)

    def __call__(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
        """z [..., d] (unnormalised encoder output) -> (z_q with straight-through grads, codes, stats)."""
        z = l2_normalize(z)
        e = self.normalized_codebook()
        codes = jnp.argmax(jnp.einsum("...d,kd->...k", z, e), axis=-1).astype(jnp.int32)
        zq = jnp.take(e, codes, axis=0)
        # Codebook loss pulls codes to encoder outputs; commitment pulls encoder outputs to their code.
        codebook_loss = jnp.mean(jnp.sum(jnp.square(zq - jax.lax.stop_gradient(z)), -1))
        commit_loss = jnp.mean(jnp.sum(jnp.square(jax.lax.stop_gradient(zq) - z), -1))
        zq_st = z + jax.lax.stop_gradient(zq - z)
        counts = jnp.zeros((self.codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
        probs = counts / jnp.maximum(counts.sum(), 1.0)
        perplexity = jnp.exp(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-12))))
        stats = dict(codebook_loss=codebook_loss, commit_loss=commit_loss, counts=counts,
                     perplexity=perplexity, usage=jnp.mean((counts > 0).astype(jnp.float32)),
                     latents=z.reshape(-1, self.code_dim))
        return zq_st, codes, stats


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------
class VQModel(nn.Module):
    """Images in [-1, 1], [B, H, W, 3] <-> codes int32[B, H/f, W/f].

    `__call__(images)` returns (reconstruction, stats) for training; `encode` / `decode` are the
    inference API (use with `apply(..., method=VQModel.encode)` or the wrappers below).
    """

    spec: VQSpec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        if s.family == "vit":
            self.encoder, self.decoder = ViTEncoder(s, self.dtype), ViTDecoder(s, self.dtype)
        elif s.family == "llamagen":
            from sgt_jax.models import llamagen_vq

            self.encoder = llamagen_vq.Encoder(s, self.dtype)
            self.decoder = llamagen_vq.Decoder(s, self.dtype)
        else:
            self.encoder, self.decoder = ConvEncoder(s, self.dtype), ConvDecoder(s, self.dtype)
        self.quantizer = Quantizer(s.codebook_size, s.code_dim)

    def __call__(self, images: Array) -> tuple[Array, dict[str, Array]]:
        zq, codes, stats = self.quantizer(self.encoder(images))
        recon = self.decoder(zq)
        stats["codes"] = codes
        return recon, stats

    def encode(self, images: Array) -> Array:
        _, codes, _ = self.quantizer(self.encoder(images))
        return codes

    def decode(self, codes: Array) -> Array:
        return self.decoder(self.quantizer.lookup(codes))


def build_model(cfg) -> VQModel:
    """The tokenizer a full experiment config describes (compute dtype from `train.compute_dtype`)."""
    return VQModel(spec_from_config(cfg), _DTYPES[cfg.train.get("compute_dtype", "float32")])


def init_params(model: VQModel, rng: Array, batch_size: int = 1) -> Any:
    """Boxed (logically partitioned) parameters; `nn.meta.unbox` gives plain arrays."""
    s = model.spec
    # Jitted: run eagerly, init dispatches (and compiles) every initializer op by itself, ~10x slower.
    return jax.jit(model.init)(rng, jnp.zeros((batch_size, s.image_size, s.image_size, 3), jnp.float32))["params"]


def encode(model: VQModel, params: Any, images: Array) -> Array:
    """images f32[B, H, W, 3] in [-1, 1] -> codes int32[B, H/f, W/f]."""
    return model.apply({"params": params}, images, method=VQModel.encode)


def decode(model: VQModel, params: Any, codes: Array) -> Array:
    """codes int32[B, h, w] -> images f32[B, H, W, 3] (roughly [-1, 1]; clip before display)."""
    return model.apply({"params": params}, codes, method=VQModel.decode)


# ---------------------------------------------------------------------------------------------
# dead-code re-initialisation (pure function; the stage calls it in-graph after each update)
# ---------------------------------------------------------------------------------------------
def update_usage(usage_ema: Array, counts: Array, decay: float) -> Array:
    """EMA of each code's assignment frequency (sums to ~1)."""
    freq = counts / jnp.maximum(counts.sum(), 1.0)
    return decay * usage_ema + (1.0 - decay) * freq


def reinit_dead_codes(codebook: Array, usage_ema: Array, latents: Array, rng: Array,
                      threshold: float) -> tuple[Array, Array, Array]:
    """Replace codes whose EMA frequency < threshold / K with randomly drawn encoder outputs.

    Returns (new codebook, new usage EMA with revived codes reset to 1/K, number replaced). The
    drawn latents get a little noise so several revived codes landing on one latent can separate.
    """
    k, d = codebook.shape
    dead = usage_ema < threshold / k
    k_pick, k_noise = jax.random.split(rng)
    pick = jax.random.randint(k_pick, (k,), 0, latents.shape[0])
    fresh = l2_normalize(latents[pick].astype(jnp.float32) + 0.01 * jax.random.normal(k_noise, (k, d)))
    new_codebook = jnp.where(dead[:, None], fresh.astype(codebook.dtype), codebook)
    new_usage = jnp.where(dead, 1.0 / k, usage_ema)
    return new_codebook, new_usage, jnp.sum(dead.astype(jnp.int32))
