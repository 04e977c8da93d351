"""Llama / Qwen2 style decoder with optional BAGEL-style Mixture-of-Transformers (MoT).

The layout (parameter names and shapes) is chosen so Hugging Face Qwen2 / Llama / Qwen3 weights map
one-to-one (see `sgt_jax/convert/hf_qwen2.py`). With `mot=True` every layer has a second set of
norms, q/k/v/o projections and MLP (suffix `_gen`) that generation tokens use; attention itself is
one softmax over the whole sequence, so text and image tokens still attend to each other. The
generation weights run only on the generation positions (gathered to a static count per row,
`GenRoute`, and scattered back), so their FLOPs scale with the image span, not the sequence.

The decoder consumes embeddings (the UMM splices ViT and code embeddings into the sequence) and
optionally a static, preallocated KV cache: `prefill` writes a whole right-padded prompt, `decode`
writes one token per row at that row's own length, so rows of different prompt lengths decode
together inside a `lax` loop.

The layers run under `nn.scan` (one compiled layer body, parameters stacked on a leading
`layers` axis, the KV cache one head-major [depth, B, kv_heads, S, head_dim] array per k / v), rematerialised by a named policy
(`layers.REMAT_POLICIES`). Attention takes its mask as lengths / segment ids (`layers.AttnSpec`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sgt_jax.models.layers import (
    AttnSpec,
    DenseGeneral,
    RMSNorm,
    cached_attention,
    check_impl,
    constrain,
    dense_init,
    dot_attention,
    flat_dot_general,
    init,
    rope,
    scanned,
    tag,
)


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
    remat: str | bool = "none"  # a layers.REMAT_POLICIES name (True = "full", False = "none")
    attention: str = "xla"  # layers.ATTENTION_IMPLS: "xla" | "cudnn" | "splash" | "explicit"
    scan_unroll: int = 1  # decoder layers unrolled per scan iteration


# {"k", "v": [depth, B, kv_heads, max_len, head_dim] (one stacked array each, head-major so a decode
# step's attention reads it without a transpose, carried through the layer scan), "length": int32[B]}
Cache = dict[str, Any]


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """A zeroed KV cache of static shape [depth, B, kv_heads, max_len, head_dim] per k / v."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.depth, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "length": jnp.zeros((batch,), jnp.int32)}


def prompt_spec(attn_mask: jax.Array, segment_ids: jax.Array | None = None) -> AttnSpec:
    """Causal attention over a right-padded (or, with segment ids, packed) prompt / training row."""
    lengths = jnp.sum(attn_mask > 0, axis=1).astype(jnp.int32)
    return AttnSpec(kv_lengths=None if segment_ids is not None else lengths, segment_ids=segment_ids, causal=True)


def decode_spec(position: jax.Array) -> AttnSpec:
    """One decode step at per-row `position`: keys 0..position of the cache."""
    return AttnSpec(kv_lengths=(position + 1).astype(jnp.int32), causal=False)


@flax.struct.dataclass
class GenRoute:
    """Where the MoT generation weights apply: `index` int32[B, G] positions (static G, each row's
    generation positions first, in order), `valid` bool[B, G] (False = filler past the row's count)."""

    index: jax.Array
    valid: jax.Array


def gen_route(gen: jax.Array, capacity: int | None = None) -> GenRoute:
    """Route for the bool [B, L] generation mask with at most `capacity` generation positions per row
    (None = L: exact for any mask). Rows with more than `capacity` route the extra ones to the text
    weights, so callers pass a capacity they know bounds the mask (the UMM: codes + <boi>)."""
    length = gen.shape[1]
    g = length if capacity is None else max(1, min(int(capacity), length))
    index = jnp.argsort(jnp.where(gen, 0, 1), axis=1, stable=True)[:, :g].astype(jnp.int32)
    return GenRoute(index=index, valid=jnp.take_along_axis(gen, index, axis=1))


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, L, ...] at positions index [B, G] -> [B, G, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _scatter(full: jax.Array, r: GenRoute, part: jax.Array) -> jax.Array:
    """full [B, L, ...] with the valid routed positions replaced by part [B, G, ...]."""
    valid = r.valid.reshape(r.valid.shape + (1,) * (full.ndim - 2))
    new = jnp.where(valid, part.astype(full.dtype), _gather(full, r.index))
    return full.at[jnp.arange(full.shape[0])[:, None], r.index].set(new)


def _routed(make, name: str, mot: bool, r: GenRoute | None, *args):
    """Apply the text module `name` and, with MoT, its `name_gen` twin on the routed positions only
    (gathered before, scattered back after), so the generation weights cost G positions, not L."""
    text_out = make(name)(*args)
    if not mot:
        return text_out
    gen_out = make(name + "_gen")(*[_gather(a, r.index) for a in args])
    return _scatter(text_out, r, gen_out)


def _write(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    """Write new K or V [B, T, KVH, D] into layer `layer` of the stacked head-major cache
    [depth, B, KVH, S, D] at per-row sequence offsets index [B].

    The stacked cache is the layer scan's carry, so a decode step updates it in place: one scatter
    of B rows. As the scan's sliced input and stacked output instead, every decode step copied and
    re-stacked the whole cache. On the speed suite's sampler shape (6 layers, 32 rows, 160 positions,
    XLA:CPU) a decode step took 21.8 ms before, 14.9 ms with the carried cache, and 6.7 ms with the
    head-major layout as well (`layers.cached_attention`).
    """
    new = new.astype(cache.dtype)
    if new.shape[1] == 1:  # advanced indices around the KVH slice: the update is [B, KVH, D]
        return cache.at[layer, jnp.arange(new.shape[0]), :, index].set(new[:, 0])
    part = jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=1))(
        jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False), jnp.swapaxes(new, 1, 2), index)
    return jax.lax.dynamic_update_index_in_dim(cache, part, layer, 0)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    cfg: LLMConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def proj(features, names, name):
            return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=jnp.float32, name=name,
                            kernel_init=init(dense_init(), names), dot_general=flat_dot_general)

        gate = tag(proj(cfg.mlp_dim, ("embed", "mlp"), "gate")(x), "mlpwi")
        up = tag(proj(cfg.mlp_dim, ("embed", "mlp"), "up")(x), "mlpwi")
        h = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return tag(proj(cfg.width, ("mlp", "embed"), "down")(h), "mlpwo")


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional QK-norm and q/k/v bias, and MoT projections."""

    cfg: LLMConfig

    @nn.compact
    def __call__(self, x, gen, positions, spec: AttnSpec, cache, layer, write_index):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def qkv(heads, head_axis):
            def make(name):
                return DenseGeneral((heads, cfg.head_dim), ("embed", head_axis, "kv"), use_bias=cfg.attn_bias,
                                    dtype=dt, name=name)
            return make

        def norm(name):
            return RMSNorm(cfg.rms_eps, dt, axis_name="kv", name=name)

        q = tag(_routed(qkv(cfg.num_heads, "heads"), "q", cfg.mot, gen, x), "query_proj")
        k = tag(_routed(qkv(cfg.num_kv_heads, "kv_heads"), "k", cfg.mot, gen, x), "key_proj")
        v = tag(_routed(qkv(cfg.num_kv_heads, "kv_heads"), "v", cfg.mot, gen, x), "value_proj")
        if cfg.qk_norm:
            q = _routed(norm, "q_norm", cfg.mot, gen, q)
            k = _routed(norm, "k_norm", cfg.mot, gen, k)
        q = constrain(rope(q, positions, cfg.rope_theta), ("batch", "length", "heads", "kv"))
        k = constrain(rope(k, positions, cfg.rope_theta), ("batch", "length", "kv_heads", "kv"))
        v = constrain(v, ("batch", "length", "kv_heads", "kv"))  # so the KV cache is sharded like the K/V heads

        new_cache = None
        if cache is not None:
            new_cache = {n: _write(cache[n], t, layer, write_index) for n, t in (("k", k), ("v", v))}
        if new_cache is not None and spec.decode:  # over everything cached so far (the spec masks the tail)
            kc, vc = (jax.lax.dynamic_index_in_dim(new_cache[n], layer, 0, keepdims=False).astype(dt)
                      for n in ("k", "v"))
            out, probs = cached_attention(q, kc, vc, spec, spec.return_probs)
        else:
            out, probs = dot_attention(q, k, v, spec, spec.return_probs)

        def out_proj(name):
            return DenseGeneral((cfg.width,), ("heads", "kv", "embed"), in_dims=2, use_bias=cfg.attn_out_bias,
                                dtype=dt, name=name)

        return tag(_routed(out_proj, "o", cfg.mot, gen, out), "out_proj"), new_cache, probs


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)); norms and MLP routed under MoT.

    Shaped as an `nn.scan` body: ((x, stacked cache or None), gen, positions, spec, layer index,
    write index) -> ((x, cache), (hidden, probs)); the cache rides in the carry (see `_write`).
    """

    cfg: LLMConfig

    @nn.compact
    def __call__(self, carry, gen, positions, spec: AttnSpec, layer, write_index):
        x, cache = carry
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def norm(name):
            return RMSNorm(cfg.rms_eps, dt, name=name)

        def mlp(name):
            return MLP(cfg, name=name)

        h = _routed(norm, "attn_norm", cfg.mot, gen, x)
        a, cache, probs = Attention(cfg, name="attn")(h, gen, positions, spec, cache, layer, write_index)
        x = x + a
        h = _routed(norm, "mlp_norm", cfg.mot, gen, x)
        x = constrain(x + _routed(mlp, "mlp", cfg.mot, gen, h), ("batch", "length", "embed"))
        return (x, cache), (x if spec.return_hidden else None, probs)


class LLM(nn.Module):
    """Token embedding, scanned decoder stack, final norm and LM head (tied or untied)."""

    cfg: LLMConfig

    def setup(self):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        check_impl(cfg.attention)
        self.embedder = nn.Embed(cfg.vocab_size, cfg.width, dtype=dt, param_dtype=jnp.float32,
                                 embedding_init=init(nn.initializers.normal(0.02), ("vocab", "embed")))
        # (x, cache) carried; (gen, positions, spec) broadcast, the layer index scanned, write_index broadcast
        self.layers = scanned(DecoderLayer, cfg.remat, cfg.depth, 3, 1, 1, cfg.scan_unroll)(cfg)
        self.final_norm = RMSNorm(cfg.rms_eps, dt)
        if cfg.mot:
            self.final_norm_gen = RMSNorm(cfg.rms_eps, dt)
        if not cfg.tied_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                                    kernel_init=init(dense_init(), ("embed", "vocab")), dot_general=flat_dot_general)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embedder(tokens)

    def logits(self, h: jax.Array) -> jax.Array:
        """LM-head logits in float32."""
        if self.cfg.tied_embeddings:  # embedder.attend, with the positions merged for the dot (flat_dot_general)
            dt = jnp.dtype(self.cfg.dtype)
            out = flat_dot_general(h.astype(dt), self.embedder.embedding.astype(dt), (((h.ndim - 1,), (1,)), ((), ())))
        else:
            out = self.lm_head(h)
        return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, x, gen, positions, spec: AttnSpec, cache: Cache | None = None, write_index=None, *,
                 return_hidden: bool = False, return_attn: bool = False, decode: bool = False,
                 gen_capacity: int | None = None):
        """Run the stack on embeddings x [B, L, D].

        gen: bool [B, L] generation-token mask (MoT routing, at most `gen_capacity` per row; ignored
        without MoT); positions: int
        [B, L] (RoPE); spec: who attends to whom (`prompt_spec` / `decode_spec`). Returns (normed
        final hidden, new {"k", "v"} stacked cache or None, hidden states [depth+1] or None,
        attention probs [depth, B, H, Lq, Lk] or None).
        """
        spec = spec.replace(impl=self.cfg.attention, return_probs=return_attn, decode=decode,
                            return_hidden=return_hidden)
        x = constrain(x.astype(jnp.dtype(self.cfg.dtype)), ("batch", "length", "embed"))
        kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        r = gen_route(gen, gen_capacity) if self.cfg.mot else None
        (out, new_kv), (hidden, attn) = self.layers((x, kv), r, positions, spec, jnp.arange(self.cfg.depth),
                                                    write_index)
        h = self.final_norm(out)
        if self.cfg.mot:
            h = _scatter(h, r, self.final_norm_gen(_gather(out, r.index)))
        if return_hidden:
            hidden = jnp.concatenate([x[None], hidden], axis=0)
        return h, new_kv, hidden, attn


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
        h, _, hidden, _ = self.llm(self.llm.embed(tokens), gen, positions, prompt_spec(attn_mask),
                                   return_hidden=return_hidden)
        logits = self.llm.logits(h)
        return (logits, hidden) if return_hidden else logits
