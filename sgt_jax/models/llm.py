"""Llama / Qwen2 style decoder with optional BAGEL-style Mixture-of-Transformers (MoT).

The layout (parameter names and shapes) is chosen so Hugging Face Qwen2 / Llama / Qwen3 weights map
one-to-one (see `sgt_jax/convert/hf_qwen2.py`). With `mot=True` every layer has a second set of
norms, q/k/v/o projections and MLP (suffix `_gen`) that generation tokens use; attention itself is
one softmax over the whole sequence, so text and image tokens still attend to each other.

The decoder consumes embeddings (the UMM splices ViT and code embeddings into the sequence) and
optionally a static, preallocated KV cache: `prefill` writes a whole right-padded prompt, `decode`
writes one token per row at that row's own length, so rows of different prompt lengths decode
together inside a `lax` loop.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgt_jax.models.layers import NEG_INF, DenseGeneral, RMSNorm, constrain, dense_init, dot_attention, init, rope


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    vocab_size: int
    width: int
    depth: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    qk_norm: bool = False
    attn_bias: bool = False  # bias on q/k/v (Qwen2)
    attn_out_bias: bool = False  # bias on the output projection (Llama attention_bias=True)
    tied_embeddings: bool = False
    rms_eps: float = 1e-6
    mot: bool = False
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: bool = False


Cache = dict[str, Any]  # {"layers": tuple({"k", "v"} per layer), "length": int32[B]}


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """A zeroed KV cache of static shape [B, max_len, kv_heads, head_dim] per layer."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.depth))
    return {"layers": layers, "length": jnp.zeros((batch,), jnp.int32)}


def causal_bias(attn_mask: jax.Array) -> jax.Array:
    """[B, 1, L, L] additive mask: query i sees key j iff j <= i and key j is not padding."""
    length = attn_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    ok = causal[None] & (attn_mask[:, None, :] > 0)
    return jnp.where(ok, 0.0, NEG_INF).astype(jnp.float32)[:, None]


def decode_bias(position: jax.Array, max_len: int) -> jax.Array:
    """[B, 1, 1, S] additive mask for one decode step at per-row `position`: keys 0..position."""
    ok = jnp.arange(max_len)[None, :] <= position[:, None]
    return jnp.where(ok, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]


def route(gen: jax.Array | None, text_value: jax.Array, gen_value: jax.Array | None) -> jax.Array:
    """Pick the generation-weight result at generation positions (gen: bool [B, L])."""
    if gen_value is None:
        return text_value
    mask = gen.reshape(gen.shape + (1,) * (text_value.ndim - gen.ndim))
    return jnp.where(mask, gen_value, text_value)


def _routed(make, name: str, mot: bool, gen, *args):
    """Apply the text module `name` and, with MoT, its `name_gen` twin; route per position."""
    text_out = make(name)(*args)
    gen_out = make(name + "_gen")(*args) if mot else None
    return route(gen, text_out, gen_out)


def _write(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Write new [B, T, ...] into cache [B, S, ...] at per-row sequence offsets index [B]."""
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0))(
        cache, new.astype(cache.dtype), index)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    cfg: LLMConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def proj(features, names, name):
            return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=jnp.float32, name=name,
                            kernel_init=init(dense_init(), names))

        h = nn.silu(proj(cfg.mlp_dim, ("embed", "mlp"), "gate")(x)) * proj(cfg.mlp_dim, ("embed", "mlp"), "up")(x)
        h = constrain(h, ("batch", "length", "mlp"))
        return proj(cfg.width, ("mlp", "embed"), "down")(h)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional QK-norm and q/k/v bias, and MoT projections."""

    cfg: LLMConfig

    @nn.compact
    def __call__(self, x, gen, positions, bias, cache, write_index, return_probs: bool, decode: bool):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def qkv(heads, head_axis):
            def make(name):
                return DenseGeneral((heads, cfg.head_dim), ("embed", head_axis, "kv"), use_bias=cfg.attn_bias,
                                    dtype=dt, name=name)
            return make

        def norm(name):
            return RMSNorm(cfg.rms_eps, dt, axis_name="kv", name=name)

        q = _routed(qkv(cfg.num_heads, "heads"), "q", cfg.mot, gen, x)
        k = _routed(qkv(cfg.num_kv_heads, "kv_heads"), "k", cfg.mot, gen, x)
        v = _routed(qkv(cfg.num_kv_heads, "kv_heads"), "v", cfg.mot, gen, x)
        if cfg.qk_norm:
            q = _routed(norm, "q_norm", cfg.mot, gen, q)
            k = _routed(norm, "k_norm", cfg.mot, gen, k)
        q = constrain(rope(q, positions, cfg.rope_theta), ("batch", "length", "heads", "kv"))
        k = constrain(rope(k, positions, cfg.rope_theta), ("batch", "length", "kv_heads", "kv"))
        v = constrain(v, ("batch", "length", "kv_heads", "kv"))  # so the KV cache is sharded like the K/V heads

        new_cache = None
        if cache is not None:
            new_cache = {"k": _write(cache["k"], k, write_index), "v": _write(cache["v"], v, write_index)}
            if decode:  # attend over everything cached so far (bias masks the unwritten tail)
                k, v = new_cache["k"].astype(dt), new_cache["v"].astype(dt)
        out, probs = dot_attention(q, k, v, bias, return_probs)

        def out_proj(name):
            return DenseGeneral((cfg.width,), ("heads", "kv", "embed"), in_dims=2, use_bias=cfg.attn_out_bias,
                                dtype=dt, name=name)

        return _routed(out_proj, "o", cfg.mot, gen, out), new_cache, probs


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)); norms and MLP routed under MoT."""

    cfg: LLMConfig

    @nn.compact
    def __call__(self, x, gen, positions, bias, cache, write_index, return_probs: bool, decode: bool):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def norm(name):
            return RMSNorm(cfg.rms_eps, dt, name=name)

        def mlp(name):
            return MLP(cfg, name=name)

        h = _routed(norm, "attn_norm", cfg.mot, gen, x)
        a, new_cache, probs = Attention(cfg, name="attn")(h, gen, positions, bias, cache, write_index,
                                                          return_probs, decode)
        x = x + a
        h = _routed(norm, "mlp_norm", cfg.mot, gen, x)
        x = x + _routed(mlp, "mlp", cfg.mot, gen, h)
        return constrain(x, ("batch", "length", "embed")), new_cache, probs


class LLM(nn.Module):
    """Token embedding, decoder stack, final norm and LM head (tied or untied)."""

    cfg: LLMConfig

    def setup(self):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        self.embedder = nn.Embed(cfg.vocab_size, cfg.width, dtype=dt, param_dtype=jnp.float32,
                                 embedding_init=init(nn.initializers.normal(0.02), ("vocab", "embed")))
        # static_argnums count `self` as 0: (return_probs, decode) are positions 7 and 8.
        layer = nn.remat(DecoderLayer, static_argnums=(7, 8)) if cfg.remat else DecoderLayer
        self.layers = [layer(cfg, name=f"layers_{i}") for i in range(cfg.depth)]
        self.final_norm = RMSNorm(cfg.rms_eps, dt)
        if cfg.mot:
            self.final_norm_gen = RMSNorm(cfg.rms_eps, dt)
        if not cfg.tied_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                                    kernel_init=init(dense_init(), ("embed", "vocab")))

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embedder(tokens)

    def logits(self, h: jax.Array) -> jax.Array:
        """LM-head logits in float32."""
        out = self.embedder.attend(h) if self.cfg.tied_embeddings else self.lm_head(h)
        return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, x, gen, positions, bias, cache: Cache | None = None, write_index=None, *,
                 return_hidden: bool = False, return_attn: bool = False, decode: bool = False):
        """Run the stack on embeddings x [B, L, D].

        gen: bool [B, L] generation-token mask (MoT routing; ignored without MoT); positions: int
        [B, L]; bias: additive mask ([B,1,L,L], or [B,1,1,S] when decoding). Returns (normed final
        hidden, new cache layers or None, hidden states [depth+1] or None, attention probs or None).
        """
        x = constrain(x.astype(jnp.dtype(self.cfg.dtype)), ("batch", "length", "embed"))
        hidden, attn, new_layers = [x], [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache["layers"][i]
            x, c, p = layer(x, gen, positions, bias, layer_cache, write_index, return_attn, decode)
            new_layers.append(c)
            if return_hidden:
                hidden.append(x)
            if return_attn:
                attn.append(p)
        h = self.final_norm(x)
        if self.cfg.mot:
            h = route(gen, h, self.final_norm_gen(x))
        return (h, tuple(new_layers) if cache is not None else None,
                jnp.stack(hidden) if return_hidden else None, jnp.stack(attn) if return_attn else None)


class CausalLM(nn.Module):
    """Text-only language model (all text tokens) with the same parameter tree as `LLM`.

    Used for HF parity and text-only uses: `apply({'params': p}, tokens, attn_mask)` -> logits.
    """

    cfg: LLMConfig

    def setup(self):
        self.llm = LLM(self.cfg)

    def __call__(self, tokens, attn_mask=None, return_hidden: bool = False):
        if attn_mask is None:
            attn_mask = jnp.ones_like(tokens)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        gen = jnp.zeros(tokens.shape, bool)
        h, _, hidden, _ = self.llm(self.llm.embed(tokens), gen, positions, causal_bias(attn_mask),
                                   return_hidden=return_hidden)
        logits = self.llm.logits(h)
        return (logits, hidden) if return_hidden else logits
