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
from sgt_jax.models.layers import ATTENTION_IMPLS, REMAT_POLICIES, chunked_cross_entropy, constrain, dense, init
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
        u, dtype, remat = cfg.model.umm, cfg.train.compute_dtype, remat_setting(cfg)
        llm = llm_lib.LLMConfig(
            vocab_size=u.llm.vocab_size, width=u.llm.width, depth=u.llm.depth, num_heads=u.llm.num_heads,
            num_kv_heads=u.llm.num_kv_heads, head_dim=u.llm.head_dim, mlp_dim=u.llm.mlp_dim,
            rope_theta=float(u.llm.rope_theta), qk_norm=u.llm.qk_norm, attn_bias=u.llm.attn_bias,
            attn_out_bias=u.llm.attn_out_bias, tied_embeddings=u.llm.tied_embeddings,
            rms_eps=float(u.llm.rms_eps), mot=u.mot, dtype=dtype, remat=remat, attention=u.llm.attention,
            scan_unroll=int(u.llm.scan_unroll))
        vit = ViTConfig(
            image_size=u.vit.image_size, patch_size=u.vit.patch_size, width=u.vit.width, depth=u.vit.depth,
            num_heads=u.vit.num_heads, mlp_dim=u.vit.mlp_dim, pos=u.vit.pos, select_layer=u.vit.select_layer,
            post_norm=u.vit.post_norm, ln_eps=float(u.vit.ln_eps),
            gelu_approximate=bool(u.vit.get("gelu_approximate", True)), dtype=dtype, remat=remat,
            attention="xla" if u.llm.attention == "cudnn" else u.llm.attention)
        return cls(llm=llm, vit=vit, codebook_size=u.codebook_size, num_codes=u.num_codes,
                   gen_embed_dim=u.gen_embed_dim, gen_adapter_dim=u.gen_adapter_dim,
                   gen_head_dim=u.gen_head_dim, und_adapter_dim=u.und_adapter_dim)


def remat_setting(cfg: ml_collections.ConfigDict) -> str:
    """The remat policy name: `train.remat_policy`, or "full"/"none" from `train.remat` when empty."""
    policy = cfg.train.get("remat_policy", "")
    return policy or ("full" if cfg.train.remat else "none")


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
    policy = remat_setting(cfg)
    if policy not in REMAT_POLICIES:
        fail("train.remat_policy", policy, f"one of {sorted(REMAT_POLICIES)} (or '' to follow train.remat)")
    if u.llm.attention not in ATTENTION_IMPLS:
        fail("model.umm.llm.attention", u.llm.attention, str(ATTENTION_IMPLS))
    if u.llm.scan_unroll < 1:
        fail("model.umm.llm.scan_unroll", u.llm.scan_unroll, "an integer >= 1")
    if u.get("text_loss_positions", 0) < 0:
        fail("model.umm.text_loss_positions", u.text_loss_positions, "0 (every position) or a count > 0")
    if u.get("loss_chunk", 1) <= 0:
        fail("model.umm.loss_chunk", u.loss_chunk, "a value > 0 (positions per LM-head chunk)")
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
    if cfg.data.get("packing", False) and cfg.stage != "umm":
        fail("data.packing", True, f"False for the {cfg.stage!r} stage (packing is for the umm stage's token rows)")


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
    """Replace x[b, start[b, k] + i] by feats[b, k, i] for i < N, for every span k (spans with
    start < 0 untouched). `feats` [B, K, N, D] / `start` [B, K]; one span per row is K = 1
    (`feats` [B, N, D], `start` [B]). Spans of a row must not overlap (packed rows never do).

    Returns (new x, bool [B, L] mask of the spans).
    """
    if start.ndim == 1:
        feats, start = feats[:, None], start[:, None]
    k_spans, n = feats.shape[1], feats.shape[2]
    pos = jnp.arange(x.shape[1])[None, :]
    src = jnp.full(x.shape[:2], -1, jnp.int32)  # index into the flattened [K * N] features, -1 = keep x
    for k in range(k_spans):  # K is small and static (data.packing_max_segments)
        idx = pos - start[:, k:k + 1]
        src = jnp.where((start[:, k:k + 1] >= 0) & (idx >= 0) & (idx < n), k * n + idx, src)
    flat = feats.reshape(feats.shape[0], k_spans * n, feats.shape[-1])
    picked = jnp.take_along_axis(flat, jnp.clip(src, 0, k_spans * n - 1)[..., None], axis=1)
    in_span = src >= 0
    return jnp.where(in_span[..., None], picked.astype(x.dtype), x), in_span


def _boi_mask(start: jax.Array, length: int) -> jax.Array:
    """bool [B, L]: the <boi> position before each code span (`start` [B] or [B, K])."""
    start = start[:, None] if start.ndim == 1 else start
    pos = jnp.arange(length)[None, None, :]
    return jnp.any((start[..., None] >= 1) & (pos == start[..., None] - 1), axis=1)


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
        if "vit_images" in inputs:  # [B, S, S, 3], or [B, K, S, S, 3] with vit_start [B, K] (packed rows)
            images = inputs["vit_images"]
            packed = images.ndim == 5
            vit_out = self.vit(images.reshape((-1,) + images.shape[-3:]) if packed else images,
                               return_hidden=return_vit)
            feats = self.und_adapter(vit_out["tokens"])
            if packed:
                feats = feats.reshape(images.shape[:2] + feats.shape[1:])
            x, _ = _splice(x, feats, inputs["vit_start"])
        gen = jnp.zeros((b, length), bool)
        if "codes" in inputs:  # [B, N] with gen_start [B], or [B, K * N] with gen_start [B, K]
            start, codes = inputs["gen_start"], inputs["codes"]
            emb = self.embed_codes(codes)
            if start.ndim == 2:
                emb = emb.reshape((b, start.shape[1], -1, emb.shape[-1]))
            x, gen = _splice(x, emb, start)
            gen = gen | _boi_mask(start, length)
        if "gen_mask" in inputs:  # explicit override (e.g. a prompt that ends in <boi>)
            gen = inputs["gen_mask"] > 0
        return x, gen, vit_out

    def _gen_capacity(self, inputs: dict) -> int | None:
        """MoT generation positions per row: a code span plus its <boi> (no bound for an explicit
        `gen_mask`, e.g. a prompt ending in <boi>, which marks arbitrary positions)."""
        if "gen_mask" in inputs:
            return None
        if "codes" not in inputs:
            return 1
        spans = inputs["gen_start"].shape[1] if inputs["gen_start"].ndim == 2 else 1
        return inputs["codes"].shape[1] + spans  # every code span plus its <boi>

    def _heads(self, h):
        return {"text_logits": self.llm.logits(h), "gen_logits": self._gen_head(h)}

    def _target_losses(self, h, targets: dict, loss_chunk: int) -> dict:
        """Cross-entropies without the full logits tensors.

        targets: `text` int32[B, T] (the text token each scored position predicts; T = L, or the
        static count of optional `text_positions` int32[B, T] gathered first) and `code_positions`
        int32[B, N] + `codes` int32[B, N] (the positions that predict each code, static N per row).
        The LM head runs sequence-tiled (`loss_chunk` positions per tile, recomputed in the backward
        pass), so [B, L, vocab] logits never exist at once; the generation head runs on the N
        gathered code positions only. Returns text_ce / text_hit [B, T] and gen_ce / gen_hit [B, N].
        """
        llm = self.llm
        if llm.cfg.tied_embeddings:
            w, spec = llm.embedder.embedding, "vd"
        else:
            w, spec = llm.lm_head.variables["params"]["kernel"], "dv"
        ht = h
        if "text_positions" in targets:  # gather the text-loss positions before the LM head
            ht = jnp.take_along_axis(h, targets["text_positions"][..., None], axis=1)
        text_ce, text_hit = chunked_cross_entropy(ht, w, targets["text"], loss_chunk, spec)
        pos = jnp.clip(targets["code_positions"], 0, h.shape[1] - 1)
        hg = jnp.take_along_axis(h, pos[..., None], axis=1)
        logits = self._gen_head(hg)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, targets["codes"][..., None], axis=-1)[..., 0]
        gen_hit = jnp.argmax(logits, axis=-1) == targets["codes"]
        return {"text_ce": text_ce, "text_hit": text_hit, "gen_ce": lse - tgt, "gen_hit": gen_hit}

    # -- training / scoring -------------------------------------------------------------------
    def __call__(self, inputs: dict, deterministic: bool = True, return_hidden: bool = False,
                 return_attn: bool = False, return_vit_hidden: bool = False, targets: dict | None = None,
                 loss_chunk: int = 512) -> dict:
        """Full forward. `deterministic` is accepted for the contract (the model has no dropout).

        Optional `segment_ids` / `positions` int32[B, L] in `inputs` describe packed rows (attention
        stays inside a segment; RoPE positions restart per segment). With `targets` (training) the
        heads run only where a loss is: see `_target_losses`; the outputs are then per-position
        losses instead of logits.

        Optional outputs (off by default so training does not pay for them): `hidden`
        [depth+1, B, L, D] residual stream per layer (pre final norm), `attn` [depth, B, H, L, L]
        attention probabilities, `vit_hidden` [blocks+1, B, N, Dv].
        """
        del deterministic
        x, gen, vit_out = self.embed_inputs(inputs, return_vit=return_vit_hidden)
        positions, spec = _positions_and_spec(inputs)
        h, _, hidden, attn = self.llm(x, gen, positions, spec, return_hidden=return_hidden, return_attn=return_attn,
                                      gen_capacity=self._gen_capacity(inputs))
        out = self._heads(h) if targets is None else self._target_losses(h, targets, loss_chunk)
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

        The cache's per-row length becomes sum(attn_mask). The heads run at each row's last real
        position only: returns ({text_logits [B, V], gen_logits [B, K]}, cache).
        """
        x, gen, _ = self.embed_inputs(inputs)
        mask = inputs["attn_mask"]
        b = mask.shape[0]
        lengths = jnp.sum(mask > 0, axis=1).astype(jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), mask.shape)
        h, kv, _, _ = self.llm(x, gen, positions, llm_lib.prompt_spec(mask), cache, jnp.zeros((b,), jnp.int32),
                               gen_capacity=self._gen_capacity(inputs))
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # heads at the last position only
        out = {k: v[:, 0] for k, v in self._heads(last).items()}
        return out, {**kv, "length": lengths}

    def decode_step(self, step: dict, cache: llm_lib.Cache) -> tuple[dict, llm_lib.Cache]:
        """Append one token per row at that row's cached length and return its logits.

        step: `tokens` int32[B] (text id, used where `is_code` is 0), `codes` int32[B] (code id,
        embedded through the generation path where `is_code` is 1), `is_code` int32[B], and `gen`
        int32[B] (1 = generation token: MoT generation weights; codes and `<boi>`). Returns
        ({text_logits [B, V], gen_logits [B, K]}, updated cache).
        """
        pos = cache["length"]
        text = self.llm.embed(step["tokens"][:, None])
        code = self.embed_codes(step["codes"][:, None]).astype(text.dtype)
        x = jnp.where((step["is_code"] > 0)[:, None, None], code, text)
        gen = (step["gen"] > 0)[:, None]
        h, kv, _, _ = self.llm(x, gen, pos[:, None], llm_lib.decode_spec(pos), cache, pos, decode=True)
        out = {k: v[:, 0] for k, v in self._heads(h).items()}
        return out, {**kv, "length": pos + 1}


def _positions_and_spec(inputs: dict):
    """RoPE positions and the attention spec of a training / scoring row: right-padded by default,
    packed when `segment_ids` (and per-segment `positions`) are given."""
    mask = inputs["attn_mask"]
    seg = inputs.get("segment_ids")
    positions = inputs.get("positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(mask.shape[1]), mask.shape)
    return positions, llm_lib.prompt_spec(mask, seg)


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


def flops_per_row(cfg: UMMConfig, seq_len: int, text_positions: int = 0, image_slots: int = 1) -> float:
    """Forward matmul FLOPs (2 x MACs) of one training row of `seq_len` positions: the decoder at
    every position, the LM head where the loss gathers it (`text_positions` per row, as
    `model.umm.text_loss_positions`; 0 = every position) and the generation head at the `num_codes`
    positions that predict a code. These are the FLOPs the step computes, whatever the row's task:
    an understanding row still runs the gathered generation head (its loss is masked). A packed row
    has `image_slots` code spans (`data.packing_max_segments`), each with its generation head.

    Under MoT the text weights run at every position and the generation weights at the routed
    `num_codes + 1` positions (codes and <boi>). Causal attention is counted at half of the full
    L x L score and value matmuls.
    """
    c = cfg.llm
    codes = image_slots * cfg.num_codes
    routed = seq_len + (min(codes + image_slots, seq_len) if c.mot else 0)  # positions through the weights
    proj = 2 * c.width * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 2 * 3 * c.width * c.mlp_dim
    attn = 2 * 2 * seq_len * c.num_heads * c.head_dim / 2
    text_head = 2 * c.width * c.vocab_size
    gen_head = 2 * (c.width * cfg.gen_head_dim + cfg.gen_head_dim * cfg.codebook_size)
    head_rows = text_positions if 0 < text_positions < seq_len else seq_len
    return float(c.depth * (routed * (proj + mlp) + seq_len * attn) + head_rows * text_head
                 + codes * gen_head)
