"""Autoregressive sampling from the UMM: image codes (with classifier-free guidance) and text.

Each generator is ONE jitted function: prefill the right-padded prompt into a static, preallocated
KV cache (`UMM.prefill`), then a `lax` loop of single-token `UMM.decode_step`s, so a whole image of
N codes costs one compile and no Python work per token. Rows may have prompts of different lengths:
the cache keeps a per-row length and each row decodes at its own position.

Classifier-free guidance (Janus / LlamaGen): the conditional rows and their unconditional twins run
as one doubled batch [cond; uncond]; at each step `logits = u + s (c - u)` (s = guidance scale) is
sampled once per pair and the same code is fed back to both rows. The unconditional prompt is the
one the training-time condition dropout produced (`sequences.SequenceBuilder.*_prefix(cond=False)`,
built by `sgt_jax.infer.prompts`), so sampling sees exactly the context the model learned.

Sampling knobs (temperature, top-k, top-p, guidance scale) enter the compiled loop as traced
scalars: sweeping them never recompiles. temperature == 0 means greedy (argmax).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.data import render
from sgt_jax.infer import prompts
from sgt_jax.models import umm as umm_lib
from sgt_jax.models import vq as vq_lib

Prefix = Mapping[str, Any]  # UMM inputs of a right-padded prompt (tokens, attn_mask[, vit_images, vit_start])
_PREFIX_KEYS = ("tokens", "attn_mask", "vit_images", "vit_start")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings (Janus defaults: CFG 5, temperature 1, no top-k / top-p)."""

    guidance_scale: float = 5.0  # 1 = conditional only, 0 = unconditional only
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0  # used when no explicit rng is passed
    # Which unconditional (CFG) row the prompt builders make for Janus-format prompts
    # (`prompts.janus_generation`): "pad" = the reference's, every prompt token between <bos> and
    # <boi> replaced by pad; "pad_prompt" = only the user text replaced. Shapes World prompts use
    # the training-time dropout row (`SequenceBuilder.*_prefix(cond=False)`).
    uncond: str = "pad"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# logits -> token
# ---------------------------------------------------------------------------------------------
def guided_logits(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: u + s (c - u). s = 0 gives u, s = 1 gives c."""
    return uncond + jnp.asarray(scale, jnp.float32) * (cond - uncond)


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (last axis).

    top_k <= 0 and top_p >= 1 switch the filters off; both may be traced scalars. The nucleus is the
    smallest prefix of the (top-k filtered) descending distribution whose mass reaches top_p, so the
    most likely token always survives. Ties with the threshold value are kept.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    rank = jnp.arange(vocab)
    in_k = rank < k
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = in_k & ((mass_before < top_p) | (top_p >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_logits(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """One token per row: argmax when temperature == 0, else a draw from the filtered
    softmax(logits / temperature). All knobs may be traced."""
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    need_filter = (jnp.asarray(top_k) > 0) | (jnp.asarray(top_p) < 1.0)
    scaled = jax.lax.cond(need_filter, lambda x: filter_logits(x, top_k, top_p), lambda x: x, scaled)
    drawn = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def _knobs(sampling: SamplingConfig) -> dict[str, jax.Array]:
    return {"guidance_scale": jnp.float32(sampling.guidance_scale), "temperature": jnp.float32(sampling.temperature),
            "top_k": jnp.int32(sampling.top_k), "top_p": jnp.float32(sampling.top_p)}


def _rng(rng, sampling: SamplingConfig) -> jax.Array:
    return jax.random.key(int(sampling.seed)) if rng is None else rng


# ---------------------------------------------------------------------------------------------
# prefixes
# ---------------------------------------------------------------------------------------------
def _as_prefix(prefix: Prefix) -> dict[str, jax.Array]:
    """Keep the UMM prompt inputs (a prefix has no code span) as device arrays."""
    if "tokens" not in prefix or "attn_mask" not in prefix:
        raise KeyError(f"a prefix needs 'tokens' and 'attn_mask'; got {sorted(prefix)}")
    try:
        empty = (np.sum(np.asarray(prefix["attn_mask"]) > 0, axis=1) == 0).any()
    except jax.errors.TracerArrayConversionError:  # called under an outer jit: shapes are all we can check
        empty = False
    if empty:
        raise ValueError("every prefix row needs at least one real token (attn_mask all 0)")
    return {k: jnp.asarray(prefix[k]) for k in _PREFIX_KEYS if k in prefix}


def _pad_to(prefix: dict, length: int) -> dict:
    extra = length - prefix["tokens"].shape[1]
    if extra == 0:
        return prefix
    out = dict(prefix)
    for k in ("tokens", "attn_mask"):
        out[k] = jnp.pad(prefix[k], ((0, 0), (0, extra)))
    return out


def _pair(cond: dict, uncond: dict) -> dict:
    """Stack [cond; uncond] rows into one batch (right-padded to a common length)."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond prefixes must carry the same inputs: {sorted(cond)} vs {sorted(uncond)}")
    if cond["tokens"].shape[0] != uncond["tokens"].shape[0]:
        raise ValueError("cond and uncond prefixes must have the same batch size")
    length = max(cond["tokens"].shape[1], uncond["tokens"].shape[1])
    cond, uncond = _pad_to(cond, length), _pad_to(uncond, length)
    return {k: jnp.concatenate([cond[k], uncond[k]], axis=0) for k in cond}


def _prefill(model: umm_lib.UMM, params, prefix: dict, extra: int, gen_last: bool):
    """Prefill a cache of length L + extra; returns (outputs, cache, lengths)."""
    b, length = prefix["tokens"].shape
    lengths = jnp.sum(prefix["attn_mask"] > 0, axis=1).astype(jnp.int32)
    inputs = dict(prefix)
    if gen_last:  # the last real token is <boi>: a generation token (MoT weights)
        inputs["gen_mask"] = (jnp.arange(length)[None, :] == lengths[:, None] - 1).astype(jnp.int32)
    cache = umm_lib.init_cache(model.cfg, b, length + extra)
    out, cache = model.apply({"params": params}, inputs, cache, method="prefill")
    return out, cache, lengths


# ---------------------------------------------------------------------------------------------
# image codes
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _codes_fn(model: umm_lib.UMM, num_codes: int, use_cfg: bool, return_logits: bool):
    """The jitted prefill + decode loop for one (model, N, cfg?) combination."""

    def run(params, prefix, knobs, rng):
        rows = prefix["tokens"].shape[0]
        b = rows // 2 if use_cfg else rows
        out, cache, lengths = _prefill(model, params, prefix, num_codes, gen_last=True)
        first = out["gen_logits"]  # prefill returns the last position's logits

        def pick(logits, t):
            if use_cfg:
                logits = guided_logits(logits[:b], logits[b:], knobs["guidance_scale"])
            code = sample_logits(logits, jax.random.fold_in(rng, t), knobs["temperature"], knobs["top_k"],
                                 knobs["top_p"])
            return code, logits

        code, logits = pick(first, 0)
        codes = jnp.zeros((b, num_codes), jnp.int32).at[:, 0].set(code)
        all_logits = (jnp.zeros((b, num_codes, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
                      if return_logits else None)
        ones = jnp.ones((rows,), jnp.int32)

        def body(t, carry):
            codes, all_logits, cache = carry
            prev = codes[:, t - 1]
            prev = jnp.concatenate([prev, prev]) if use_cfg else prev  # same code into both rows of a pair
            step = {"tokens": jnp.zeros_like(prev), "codes": prev, "is_code": ones, "gen": ones}
            o, cache = model.apply({"params": params}, step, cache, method="decode_step")
            code, logits = pick(o["gen_logits"], t)
            codes = codes.at[:, t].set(code)
            if return_logits:
                all_logits = all_logits.at[:, t].set(logits)
            return codes, all_logits, cache

        codes, all_logits, _ = jax.lax.fori_loop(1, num_codes, body, (codes, all_logits, cache))
        return (codes, all_logits) if return_logits else codes

    return jax.jit(run)


def generate_codes(model: umm_lib.UMM, params, prefix: Prefix, num_codes: int | None = None,
                   sampling: SamplingConfig = SamplingConfig(), rng: jax.Array | None = None,
                   uncond_prefix: Prefix | None = None, *, return_logits: bool = False):
    """Sample `num_codes` VQ codes after each prefix row (which must end with `<boi>`).

    params: the UMM params. With `uncond_prefix` (same batch size, same inputs; see
    `prompts.*_pair`) cond and uncond rows run as one doubled batch and are guided with
    `sampling.guidance_scale`; without it the conditional rows alone are sampled (pass None to save
    the doubled batch when the scale is 1). Returns int32[B, N] codes, and with `return_logits` also
    the float32[B, N, K] (guided) logits each code was drawn from.
    """
    num_codes = int(num_codes or model.cfg.num_codes)
    cond = _as_prefix(prefix)
    use_cfg = uncond_prefix is not None
    batch = _pair(cond, _as_prefix(uncond_prefix)) if use_cfg else cond
    fn = _codes_fn(model, num_codes, use_cfg, bool(return_logits))
    return fn(params, batch, _knobs(sampling), _rng(rng, sampling))


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _text_fn(model: umm_lib.UMM, max_new_tokens: int):

    def run(params, prefix, knobs, rng, eos_id, pad_id):
        b = prefix["tokens"].shape[0]
        out, cache, lengths = _prefill(model, params, prefix, max_new_tokens, gen_last=False)
        first = out["text_logits"]

        def pick(logits, t):
            return sample_logits(logits, jax.random.fold_in(rng, t), knobs["temperature"], knobs["top_k"],
                                 knobs["top_p"])

        tok = pick(first, 0)
        tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
        done = tok == eos_id
        zeros = jnp.zeros((b,), jnp.int32)

        def cond(carry):
            t, _, done, _ = carry
            return (t < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            t, tokens, done, cache = carry
            step = {"tokens": tokens[:, t - 1], "codes": zeros, "is_code": zeros, "gen": zeros}
            o, cache = model.apply({"params": params}, step, cache, method="decode_step")
            tok = jnp.where(done, pad_id, pick(o["text_logits"], t))
            return t + 1, tokens.at[:, t].set(tok), done | (tok == eos_id), cache

        _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, cache))
        return tokens

    return jax.jit(run)


def generate_text(model: umm_lib.UMM, params, prefix: Prefix, max_new_tokens: int, eos_id: int,
                  sampling: SamplingConfig = SamplingConfig(temperature=0.0), rng: jax.Array | None = None,
                  *, pad_id: int | None = None) -> jax.Array:
    """Continue each prefix row with up to `max_new_tokens` text tokens (greedy if temperature 0).

    A row stops at its first `eos_id` (kept in the output); positions after it hold `pad_id`
    (default: eos_id). The loop exits as soon as every row has stopped. Guidance is not used.
    Returns int32[B, max_new_tokens].
    """
    fn = _text_fn(model, int(max_new_tokens))
    pad = eos_id if pad_id is None else pad_id
    return fn(params, _as_prefix(prefix), _knobs(sampling), _rng(rng, sampling), jnp.int32(eos_id), jnp.int32(pad))


def text_lengths(tokens, eos_id: int) -> np.ndarray:
    """Tokens up to and including the first eos per row (max length when a row never stopped)."""
    tokens = np.asarray(tokens)
    hit = tokens == eos_id
    return np.where(hit.any(1), hit.argmax(1) + 1, tokens.shape[1])


# ---------------------------------------------------------------------------------------------
# images and masks
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _decode_fn(vq_model: vq_lib.VQModel):
    def run(vq_params, codes):
        g = vq_model.spec.grid
        images = vq_lib.decode(vq_model, vq_params, codes.reshape(codes.shape[0], g, g))
        return jnp.round(jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)
    return jax.jit(run)


def decode_codes(vq_model: vq_lib.VQModel, vq_params, codes) -> np.ndarray:
    """int32[B, N] codes -> uint8[B, H, W, 3] images through the VQ decoder ([-1, 1] -> [0, 255])."""
    codes = jnp.asarray(codes, jnp.int32)
    if codes.shape[1] != vq_model.spec.num_codes:
        raise ValueError(f"got {codes.shape[1]} codes per image; the VQ decodes {vq_model.spec.num_codes}")
    return np.asarray(_decode_fn(vq_model)(vq_params, codes))


def generate_images(model: umm_lib.UMM, params, vq_model: vq_lib.VQModel, vq_params, prefix: Prefix,
                    sampling: SamplingConfig = SamplingConfig(), rng: jax.Array | None = None,
                    uncond_prefix: Prefix | None = None) -> np.ndarray:
    """Sample codes for each prefix row (CFG with `uncond_prefix`) and decode: uint8[B, H, W, 3]."""
    codes = generate_codes(model, params, prefix, vq_model.spec.num_codes, sampling, rng, uncond_prefix)
    return decode_codes(vq_model, vq_params, codes)


_MAP_DECODERS = {"segmentation": "rgb_to_instance", "semantic": "rgb_to_semantic"}


def segment(model: umm_lib.UMM, params, vq_model: vq_lib.VQModel, vq_params, builder, images,
            sampling: SamplingConfig = SamplingConfig(guidance_scale=1.0, temperature=0.0),
            rng: jax.Array | None = None, *, instruction: str | None = None, proxy: str = "segmentation",
            return_rgb: bool = False):
    """Image -> instruction -> mask codes -> decoded mask RGB -> label map (nearest palette colour).

    images: uint8[B, H, W, 3] (or a list); builder: `sequences.SequenceBuilder`. The instruction
    defaults to the first training instruction of `proxy` ("segmentation": instance ids,
    "semantic": class ids). Returns uint8[B, h, w] maps at the VQ image size (and the RGB masks with
    `return_rgb`). Default sampling is greedy without guidance; pass a guidance scale != 1 to guide
    against the instruction-dropped prompt.
    """

    if proxy not in _MAP_DECODERS:
        raise ValueError(f"segment() decodes label maps for {sorted(_MAP_DECODERS)}; got proxy {proxy!r}")
    cond, uncond = prompts.proxy_pair(builder, images, instruction, proxy=proxy)
    rgb = generate_images(model, params, vq_model, vq_params, cond, sampling, rng,
                          uncond if float(sampling.guidance_scale) != 1.0 else None)
    maps = getattr(render, _MAP_DECODERS[proxy])(rgb)
    return (maps, rgb) if return_rgb else maps
