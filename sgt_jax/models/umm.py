"""The unified multimodal model (Janus-style discrete UMM) and its call contract.

One decoder reads a single sequence in which three kinds of positions are spliced together:
text tokens (LLM embedding), an understanding image (ViT -> 2-layer GELU MLP adapter, a contiguous
span starting at `vit_start`) and a generation image (VQ code ids -> own embedding table -> MLP
adapter, a span starting at `gen_start`). Outputs at every position go through both heads: the LM
head (`text_logits`, next text token) and the generation head (`gen_logits`, MLP -> codebook logits,
position p predicts the code at p + 1); the loss picks which one applies where.

Generation tokens are the code span plus the `<boi>` position right before it; with `mot=True`
they use the MoT generation weights (see `llm.py`). `prefill` / `decode_step` drive sampling with a
static preallocated KV cache (`init_cache`) so the sampler can run a jitted `lax` loop.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sgt_jax import config as config_lib
from sgt_jax.models import llm as llm_lib
from sgt_jax.models.layers import constrain, dense, init
from sgt_jax.models.vit import ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class UMMConfig:
    llm: llm_lib.LLMConfig
    vit: ViTConfig
    codebook_size: int
    num_codes: int
    gen_embed_dim: int
    gen_adapter_dim: int
    gen_head_dim: int
    und_adapter_dim: int

    @property
    def num_vit_tokens(self) -> int:
        return self.vit.num_tokens

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "UMMConfig":
        """Build from a finalized, validated experiment config (model.umm + train.compute_dtype / train.remat)."""
        if not config_lib.is_finalized(cfg):
            raise config_lib.ConfigError("UMMConfig.from_config needs a finalized config: call "
                                         "sgt_jax.config.finalize(cfg) after all overrides")
        u, dtype, remat = cfg.model.umm, cfg.train.compute_dtype, bool(cfg.train.remat)
        llm = llm_lib.LLMConfig(
            vocab_size=u.llm.vocab_size, width=u.llm.width, depth=u.llm.depth, num_heads=u.llm.num_heads,
            num_kv_heads=u.llm.num_kv_heads, head_dim=u.llm.head_dim, mlp_dim=u.llm.mlp_dim,
            rope_theta=float(u.llm.rope_theta), qk_norm=u.llm.qk_norm, attn_bias=u.llm.attn_bias,
            attn_out_bias=u.llm.attn_out_bias, tied_embeddings=u.llm.tied_embeddings,
            rms_eps=float(u.llm.rms_eps), mot=u.mot, dtype=dtype, remat=remat)
        vit = ViTConfig(
            image_size=u.vit.image_size, patch_size=u.vit.patch_size, width=u.vit.width, depth=u.vit.depth,
            num_heads=u.vit.num_heads, mlp_dim=u.vit.mlp_dim, pos=u.vit.pos, select_layer=u.vit.select_layer,
            post_norm=u.vit.post_norm, ln_eps=float(u.vit.ln_eps),
            gelu_approximate=bool(u.vit.get("gelu_approximate", True)), dtype=dtype, remat=remat)
        return cls(llm=llm, vit=vit, codebook_size=u.codebook_size, num_codes=u.num_codes,
                   gen_embed_dim=u.gen_embed_dim, gen_adapter_dim=u.gen_adapter_dim,
                   gen_head_dim=u.gen_head_dim, und_adapter_dim=u.und_adapter_dim)


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Rules of `model.umm` (listed in sgt_jax/checks.py; they apply to every config, so a config
    passes or fails the same way whichever stage it trains). The fields tying the UMM to the VQ and
    the data (`codebook_size`, `num_codes`) are derived by `config.finalize`, so they cannot disagree."""
    u = cfg.model.umm

    def fail(path, value, allowed):
        raise config_lib.ConfigError(f"config field '{path}' = {value!r} is not allowed; allowed: {allowed}")

    for path in ("llm.vocab_size", "llm.width", "llm.depth", "llm.num_heads", "llm.num_kv_heads",
                 "llm.head_dim", "llm.mlp_dim", "vit.image_size", "vit.patch_size", "vit.width",
                 "vit.depth", "vit.num_heads", "vit.mlp_dim", "codebook_size", "num_codes",
                 "gen_embed_dim", "gen_adapter_dim", "gen_head_dim", "und_adapter_dim"):
        section, leaf = path.split(".") if "." in path else (None, path)
        value = u[section][leaf] if section else u[leaf]
        if value <= 0:
            fail(f"model.umm.{path}", value, "a value > 0")
    if u.llm.num_heads % u.llm.num_kv_heads:
        fail("model.umm.llm.num_kv_heads", u.llm.num_kv_heads, f"a divisor of llm.num_heads ({u.llm.num_heads})")
    if u.llm.head_dim % 2:
        fail("model.umm.llm.head_dim", u.llm.head_dim, "an even number (RoPE rotates pairs)")
    if u.llm.rope_theta <= 0 or u.llm.rms_eps <= 0:
        fail("model.umm.llm.rope_theta/rms_eps", (u.llm.rope_theta, u.llm.rms_eps), "values > 0")
    if u.vit.width % u.vit.num_heads:
        fail("model.umm.vit.num_heads", u.vit.num_heads, f"a divisor of vit.width ({u.vit.width})")
    if u.vit.image_size % u.vit.patch_size:
        fail("model.umm.vit.patch_size", u.vit.patch_size, f"a divisor of vit.image_size ({u.vit.image_size})")
    if u.vit.pos == "sincos" and u.vit.width % 4:
        fail("model.umm.vit.width", u.vit.width, "a multiple of 4 with sincos positions")
    if not -(u.vit.depth + 1) <= u.vit.select_layer <= u.vit.depth:
        fail("model.umm.vit.select_layer", u.vit.select_layer, f"in [{-(u.vit.depth + 1)}, {u.vit.depth}]")


class MLPAdapter(nn.Module):
    """Linear -> GELU -> Linear into the LLM width (Janus aligner)."""

    hidden: int
    out: int
    in_axis: str = "embed"
    out_axis: str = "embed"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(dense(self.hidden, (self.in_axis, "mlp"), self.dtype, name="fc1")(x), approximate=False)
        return dense(self.out, ("mlp", self.out_axis), self.dtype, name="fc2")(x)


def _splice(x: jax.Array, feats: jax.Array, start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replace x[b, start[b] + i] by feats[b, i] for i < N (rows with start < 0 untouched).

    Returns (new x, bool [B, L] mask of the span).
    """
    n = feats.shape[1]
    idx = jnp.arange(x.shape[1])[None, :] - start[:, None]
    in_span = (start[:, None] >= 0) & (idx >= 0) & (idx < n)
    picked = jnp.take_along_axis(feats, jnp.clip(idx, 0, n - 1)[..., None], axis=1)
    return jnp.where(in_span[..., None], picked.astype(x.dtype), x), in_span


class UMM(nn.Module):
    """Unified model: `apply({'params': p}, inputs)` -> dict(text_logits, gen_logits[, hidden, attn])."""

    cfg: UMMConfig

    def setup(self):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.llm.dtype)
        width = cfg.llm.width
        self.llm = llm_lib.LLM(cfg.llm)
        self.vit = ViT(cfg.vit)
        self.und_adapter = MLPAdapter(cfg.und_adapter_dim, width, dtype=dt)
        self.code_embed = nn.Embed(cfg.codebook_size, cfg.gen_embed_dim, dtype=dt, param_dtype=jnp.float32,
                                   embedding_init=init(nn.initializers.normal(1.0), ("vocab", "code_dim")))
        self.gen_adapter = MLPAdapter(cfg.gen_adapter_dim, width, in_axis="code_dim", dtype=dt)
        self.gen_head = MLPAdapter(cfg.gen_head_dim, cfg.codebook_size, out_axis="vocab", dtype=dt)

    # -- pieces ---------------------------------------------------------------------------------
    def _gen_head(self, h):
        return constrain(self.gen_head(h).astype(jnp.float32), ("batch", "length", "vocab"))

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        return self.gen_adapter(self.code_embed(codes))

    def embed_inputs(self, inputs: dict, return_vit: bool = False):
        """Token embeddings with ViT and code spans spliced in; returns (x, gen mask, vit outputs)."""
        tokens = inputs["tokens"]
        x = self.llm.embed(tokens)
        b, length = tokens.shape
        vit_out = None
        if "vit_images" in inputs:
            vit_out = self.vit(inputs["vit_images"], return_hidden=return_vit)
            x, _ = _splice(x, self.und_adapter(vit_out["tokens"]), inputs["vit_start"])
        gen = jnp.zeros((b, length), bool)
        if "codes" in inputs:
            start = inputs["gen_start"]
            x, gen = _splice(x, self.embed_codes(inputs["codes"]), start)
            boi = (start[:, None] >= 1) & (jnp.arange(length)[None, :] == start[:, None] - 1)
            gen = gen | boi
        if "gen_mask" in inputs:  # explicit override (e.g. a prompt that ends in <boi>)
            gen = inputs["gen_mask"] > 0
        return x, gen, vit_out

    def _heads(self, h):
        return {"text_logits": self.llm.logits(h), "gen_logits": self._gen_head(h)}

    # -- training / scoring -------------------------------------------------------------------
    def __call__(self, inputs: dict, deterministic: bool = True, return_hidden: bool = False,
                 return_attn: bool = False, return_vit_hidden: bool = False) -> dict:
        """Full forward. `deterministic` is accepted for the contract (the model has no dropout).

        Optional outputs (off by default so training does not pay for them): `hidden`
        [depth+1, B, L, D] residual stream per layer (pre final norm), `attn` [depth, B, H, L, L]
        attention probabilities, `vit_hidden` [blocks+1, B, N, Dv].
        """
        del deterministic
        x, gen, vit_out = self.embed_inputs(inputs, return_vit=return_vit_hidden)
        mask = inputs["attn_mask"]
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), mask.shape)
        h, _, hidden, attn = self.llm(x, gen, positions, llm_lib.causal_bias(mask),
                                      return_hidden=return_hidden, return_attn=return_attn)
        out = self._heads(h)
        out["gen_mask"] = gen
        if return_hidden:
            out["hidden"] = hidden
        if return_attn:
            out["attn"] = attn
        if return_vit_hidden and vit_out is not None:
            out["vit_hidden"] = vit_out["hidden"]
        return out

    # -- sampling ---------------------------------------------------------------------------------
    def prefill(self, inputs: dict, cache: llm_lib.Cache) -> tuple[dict, llm_lib.Cache]:
        """Run a right-padded prompt (same `inputs` as `__call__`), writing its K/V into `cache`.

        The cache's per-row length becomes sum(attn_mask); read each row's next-token logits at
        position length - 1.
        """
        x, gen, _ = self.embed_inputs(inputs)
        mask = inputs["attn_mask"]
        b = mask.shape[0]
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), mask.shape)
        h, layers, _, _ = self.llm(x, gen, positions, llm_lib.causal_bias(mask), cache,
                                   jnp.zeros((b,), jnp.int32))
        out = self._heads(h)
        return out, {"layers": layers, "length": jnp.sum(mask > 0, axis=1).astype(jnp.int32)}

    def decode_step(self, step: dict, cache: llm_lib.Cache) -> tuple[dict, llm_lib.Cache]:
        """Append one token per row at that row's cached length and return its logits.

        step: `tokens` int32[B] (text id, used where `is_code` is 0), `codes` int32[B] (code id,
        embedded through the generation path where `is_code` is 1), `is_code` int32[B], and `gen`
        int32[B] (1 = generation token: MoT generation weights; codes and `<boi>`). Returns
        ({text_logits [B, V], gen_logits [B, K]}, updated cache).
        """
        pos = cache["length"]
        max_len = cache["layers"][0]["k"].shape[1]
        text = self.llm.embed(step["tokens"][:, None])
        code = self.embed_codes(step["codes"][:, None]).astype(text.dtype)
        x = jnp.where((step["is_code"] > 0)[:, None, None], code, text)
        gen = (step["gen"] > 0)[:, None]
        h, layers, _, _ = self.llm(x, gen, pos[:, None], llm_lib.decode_bias(pos, max_len), cache, pos,
                                   decode=True)
        out = {k: v[:, 0] for k, v in self._heads(h).items()}
        return out, {"layers": layers, "length": pos + 1}


def init_cache(cfg: UMMConfig, batch: int, max_len: int, dtype: Any = None) -> llm_lib.Cache:
    """Static KV cache for `UMM.prefill` / `UMM.decode_step` (compute dtype unless given)."""
    return llm_lib.init_cache(cfg.llm, batch, max_len, dtype)


def dummy_inputs(cfg: UMMConfig, batch: int, seq_len: int) -> dict:
    """Shape-correct inputs for `init` / `eval_shape` (ViT span at 1, code span right after)."""
    n_vit, n_codes = cfg.num_vit_tokens, cfg.num_codes
    if seq_len < 2 + n_vit + n_codes:
        raise ValueError(f"seq_len {seq_len} too short for {n_vit} ViT + {n_codes} code positions")
    return {
        "tokens": jnp.zeros((batch, seq_len), jnp.int32),
        "attn_mask": jnp.ones((batch, seq_len), jnp.int32),
        "vit_images": jnp.zeros((batch, cfg.vit.image_size, cfg.vit.image_size, 3), jnp.float32),
        "vit_start": jnp.ones((batch,), jnp.int32),
        "codes": jnp.zeros((batch, n_codes), jnp.int32),
        "gen_start": jnp.full((batch,), 2 + n_vit, jnp.int32),
    }


def flops_per_token(cfg: UMMConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per sequence position (2 x MACs) of the decoder and both heads.

    Under MoT both weight sets run at every position (routing is a select), which this counts.
    Causal attention is counted at half of the full L x L score and value matmuls.
    """
    c = cfg.llm
    mot = 2 if c.mot else 1
    proj = 2 * c.width * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 2 * 3 * c.width * c.mlp_dim
    attn = 2 * 2 * seq_len * c.num_heads * c.head_dim / 2
    heads = 2 * c.width * c.vocab_size + 2 * (c.width * cfg.gen_head_dim + cfg.gen_head_dim * cfg.codebook_size)
    return float(c.depth * (mot * (proj + mlp) + attn) + heads)
