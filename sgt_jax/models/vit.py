"""ViT understanding encoder (SigLIP layout) for the UMM.

Patch embedding (a strided conv with bias), learned or fixed 2-D sin-cos positions, pre-norm
blocks (LayerNorm, multi-head attention with biases, GELU MLP: tanh by default, exact by flag) and an optional final
LayerNorm. `select_layer` picks which hidden state feeds the adapter (LLaVA/Janus style): it
indexes the list [patch embeddings, block 1, ..., block depth], negative from the end; blocks past
the selected one are not built at all. The parameter tree mirrors HF `SiglipVisionModel` so its
weights load one-to-one (`sgt_jax/convert/hf_siglip.py`), except that the blocks run under
`nn.scan` with their parameters stacked on a leading `layers` axis (`blocks/...`).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sgt_jax.models.layers import (
    AttnSpec,
    DenseGeneral,
    constrain,
    dense,
    dense_init,
    dot_attention,
    init,
    layer_norm,
    scanned,
)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 512
    pos: str = "learned"  # "learned" | "sincos"
    select_layer: int = -1
    post_norm: bool = True  # final LayerNorm on the selected output (SigLIP post_layernorm)
    ln_eps: float = 1e-6
    gelu_approximate: bool = True  # False: exact erf GELU (Janus-Pro's timm SigLIP-L)
    dtype: str = "float32"
    remat: str | bool = "none"  # a layers.REMAT_POLICIES name (True = "full", False = "none")
    attention: str = "xla"  # layers.ATTENTION_IMPLS

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2

    @property
    def num_blocks(self) -> int:
        """Blocks actually run: those up to the selected hidden state."""
        return self.select_layer if self.select_layer >= 0 else self.depth + 1 + self.select_layer


def sincos_2d(grid: int, width: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table [grid*grid, width] (half the channels per axis), row-major."""
    assert width % 4 == 0, "sincos positions need width divisible by 4"
    quarter = width // 4
    omega = 1.0 / (10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    out = [np.sin(np.outer(ys.ravel(), omega)), np.cos(np.outer(ys.ravel(), omega)),
           np.sin(np.outer(xs.ravel(), omega)), np.cos(np.outer(xs.ravel(), omega))]
    return np.concatenate(out, axis=1).astype(np.float32)


class ViTBlock(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x, spec: AttnSpec):
        """An `nn.scan` body: x -> (x, (x if spec.return_hidden else None, probs or None))."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        head_dim = cfg.width // cfg.num_heads

        def qkv(name):
            return DenseGeneral((cfg.num_heads, head_dim), ("embed", "heads", "kv"), use_bias=True, dtype=dt,
                                name=name)

        h = layer_norm(cfg.ln_eps, dt, "norm1")(x)
        out, probs = dot_attention(qkv("q")(h), qkv("k")(h), qkv("v")(h), spec, spec.return_probs)
        x = x + DenseGeneral((cfg.width,), ("heads", "kv", "embed"), in_dims=2, use_bias=True, dtype=dt,
                             name="o")(out)
        h = layer_norm(cfg.ln_eps, dt, "norm2")(x)
        h = nn.gelu(dense(cfg.mlp_dim, ("embed", "mlp"), dt, name="fc1")(h), approximate=cfg.gelu_approximate)
        h = constrain(h, ("batch", "length", "mlp"))
        x = x + dense(cfg.width, ("mlp", "embed"), dt, name="fc2")(h)
        x = constrain(x, ("batch", "length", "embed"))
        return x, (x if spec.return_hidden else None, probs)


class ViT(nn.Module):
    """images f32 [B, H, W, 3] in [-1, 1] -> tokens [B, num_tokens, width] (plus optional per-layer states)."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images, return_hidden: bool = False, return_attn: bool = False):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        p = cfg.patch_size
        x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=dt, param_dtype=jnp.float32,
                    name="patch_embed", kernel_init=init(dense_init(), (None, None, None, "embed")),
                    bias_init=init(nn.initializers.zeros, ("embed",)))(images.astype(dt))
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.width)
        if cfg.pos == "learned":
            pos = self.param("pos_embed", init(nn.initializers.normal(0.02), ("length", "embed")),
                             (cfg.num_tokens, cfg.width), jnp.float32)
        elif cfg.pos == "sincos":
            pos = jnp.asarray(sincos_2d(cfg.grid, cfg.width))
        else:
            raise ValueError(f"ViT pos must be 'learned' or 'sincos', got {cfg.pos!r}")
        x = constrain(x + pos.astype(dt)[None], ("batch", "length", "embed"))
        spec = AttnSpec(causal=False, impl=cfg.attention, return_probs=return_attn, return_hidden=return_hidden)
        first, hidden, attn = x, None, None
        if cfg.num_blocks:
            x, (hidden, attn) = scanned(ViTBlock, cfg.remat, cfg.num_blocks, 1)(cfg, name="blocks")(x, spec)
        if cfg.post_norm:
            x = layer_norm(cfg.ln_eps, dt, "post_norm")(x)
        out = {"tokens": x}
        if return_hidden:
            out["hidden"] = first[None] if hidden is None else jnp.concatenate([first[None], hidden])
        if return_attn:
            out["attn"] = attn if attn is not None else jnp.zeros((0, b, cfg.num_heads, cfg.num_tokens,
                                                                   cfg.num_tokens), jnp.float32)
        return out


def vit_flops_per_image(cfg: ViTConfig) -> float:
    """Forward matmul FLOPs of one image (2 x MACs), for MFU accounting."""
    n, d = cfg.num_tokens, cfg.width
    patch = 2 * n * (cfg.patch_size ** 2 * 3) * d
    per_block = 2 * n * (4 * d * d + 2 * d * cfg.mlp_dim) + 2 * 2 * n * n * d
    return float(patch + cfg.num_blocks * per_block)

