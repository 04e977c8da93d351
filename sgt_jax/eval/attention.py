"""Attention allocation per LLM layer: where the model looks, in understanding and in generation.

Why: the paper reports that after SGT the last text tokens of a question attend more to the image
(most in the upper-middle layers), and that image tokens being generated attend more to position
words of the prompt and less to filler words. Both are shares of attention probability mass:

* understanding (`understanding_shares`): queries = the last `query_tokens` real tokens of an
  `<bos> <img> [V] </img> question` prompt (CV-Bench items); keys grouped into `image` (the ViT span),
  `question` (question tokens) and `special` (<bos>, <img>, </img>). Per layer, the mass is averaged
  over heads, query tokens and items; the three shares sum to 1 (causal attention only reaches
  these keys).
* generation (`generation_shares`): text-to-image rows `<bos> prompt <boi> [N codes]` with GenEval-style
  prompts, **teacher-forced on the ground-truth codes** (the VQ codes of a scene that satisfies the
  prompt exactly; cheaper than sampling and independent of sample quality). Queries = the N code
  positions; keys = prompt tokens grouped by the kind of word they belong to (`object`, `color`,
  `position`, `count`, `other` = filler such as "a photo of"). Shares are normalised over the prompt
  words (they sum to 1 per layer, the paper's measure); `prompt_total` is the fraction of all
  attention mass that reaches the prompt at all (with `bos`, `boi` and `image`, the codes already
  generated, it sums to 1).
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.data import shapes_world as sw
from sgt_jax.data import text

UNDERSTANDING_GROUPS: tuple[str, ...] = ("image", "question", "special")
WORD_KINDS: tuple[str, ...] = ("object", "color", "position", "count", "other")
# Non-prompt keys a code position can attend to (kept apart so the prompt shares can be normalised).
_GEN_EXTRA: tuple[str, ...] = ("bos", "boi", "image")

_OBJECT_WORDS = set(sw.SHAPES) | set(sw.PLURALS.values()) | {"object", "objects", "shape", "shapes"}
_COLOR_WORDS = set(sw.COLORS)
_POSITION_WORDS = {"left", "right", "above", "below", "top", "bottom", "behind", "front"}
_COUNT_WORDS = set(text.NUMBER_WORDS[1:]) | {str(i) for i in range(1, 16)}


def word_kind(word: str, previous: str | None = None) -> str:
    """Kind of one prompt word; "of" in "left of" / "right of" belongs to the position phrase."""
    w = word.lower()
    if w in _OBJECT_WORDS:
        return "object"
    if w in _COLOR_WORDS:
        return "color"
    if w in _POSITION_WORDS or (w == "of" and (previous or "").lower() in ("left", "right")):
        return "position"
    if w in _COUNT_WORDS:
        return "count"
    return "other"


def token_kinds(tokenizer, prompt: str) -> list[str]:
    """The word kind of each token of `tokenizer.encode(prompt, add_special_tokens=False)`, from the
    fast tokenizer's character offsets (a token belongs to the word holding its first letter)."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    words = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\w+", prompt)]
    kinds_of_words = [word_kind(w, words[i - 1][2] if i else None) for i, (_, _, w) in enumerate(words)]
    out = []
    for start, end in enc["offset_mapping"]:
        kind = "other"
        for (ws, we, _), k in zip(words, kinds_of_words, strict=True):
            if start < we and end > ws:  # the token overlaps this word
                kind = k
                break
        out.append(kind)
    return out


def group_mass(attn: jax.Array, query_mask: jax.Array, key_groups: jax.Array, num_groups: int) -> jax.Array:
    """Attention mass per key group, summed over query positions and averaged over heads.

    attn [D, B, H, Lq, Lk] probabilities; query_mask [B, Lq] (1 = a query to count); key_groups
    int [B, Lk] group id per key (-1 = not counted). Returns [B, D, G]; dividing by the number of
    queries of the row gives mean shares."""
    per_key = jnp.einsum("dbhqk,bq->dbk", attn.astype(jnp.float32), query_mask.astype(jnp.float32))
    per_key = per_key / attn.shape[2]
    onehot = jax.nn.one_hot(key_groups, num_groups, dtype=jnp.float32)  # -1 -> all zeros
    return jnp.einsum("dbk,bkg->bdg", per_key, onehot)


@partial(jax.jit, static_argnums=(0, 5))
def _mass(model, params, inputs, query_mask, key_groups, num_groups: int):
    out = model.apply({"params": params}, inputs, return_attn=True)
    return group_mass(out["attn"], query_mask, key_groups, num_groups), jnp.sum(query_mask, axis=1)


def _shares(run, rows: Sequence[Any], make, num_groups: int, batch_size: int) -> np.ndarray:
    """Mean share per (layer, group) over all query tokens of all rows: [D, G]."""
    fn = partial(_mass, run.model)
    mass, nq = run.map_batches(lambda p, x: fn(p, x[0], x[1], x[2], num_groups), make, list(rows), batch_size)
    return np.asarray(mass).sum(0) / max(float(np.asarray(nq).sum()), 1.0)


def understanding_shares(run, items: Sequence[Mapping[str, Any]], *, query_tokens: int = 4,
                         batch_size: int = 16) -> dict[str, Any]:
    """Per-layer share of attention from the last question tokens to image / question / special keys
    (CV-Bench items: dicts with `question`, `choices`, `image`)."""
    b = run.builder
    length = b.layout.max_seq_len
    n_vit = b.layout.num_vit_tokens

    def make(chunk):
        tokens = np.full((len(chunk), length), b.ids.pad, np.int32)
        mask = np.zeros_like(tokens)
        qmask = np.zeros_like(tokens)
        groups = np.full_like(tokens, -1)
        images = []
        for r, item in enumerate(chunk):
            prompt, _ = text.format_mcq(item)
            ids, vit_start = b.understanding_prefix(prompt)
            ids = ids[:2 + n_vit + 1] + ids[2 + n_vit + 1:][-(length - (3 + n_vit)):]  # keep the question's end
            n = len(ids)
            tokens[r, :n], mask[r, :n] = ids, 1
            qmask[r, max(3 + n_vit, n - query_tokens):n] = 1
            groups[r, :n] = UNDERSTANDING_GROUPS.index("question")
            groups[r, [0, 1, 2 + n_vit]] = UNDERSTANDING_GROUPS.index("special")
            groups[r, vit_start:vit_start + n_vit] = UNDERSTANDING_GROUPS.index("image")
            images.append(item["image"])
        inputs = {"tokens": tokens, "attn_mask": mask, "vit_images": run.vit_pixels(np.stack(images)),
                  "vit_start": np.full((len(chunk),), 2, np.int32)}
        return run.with_empty_spans(inputs, codes=True), qmask, groups

    shares = _shares(run, items, make, len(UNDERSTANDING_GROUPS), batch_size)
    out: dict[str, Any] = {g: shares[:, i].tolist() for i, g in enumerate(UNDERSTANDING_GROUPS)}
    out.update(layers=[f"llm_{i + 1}" for i in range(shares.shape[0])], query_tokens=int(query_tokens),
               num_items=len(items))
    return out


def generation_rows(world: sw.WorldConfig, n: int, seed: int = 0, split: str = "test") -> list[dict]:
    """GenEval-style prompts (cycling through the six tags) with a ground-truth scene for each."""
    per_tag = -(-int(n) // 6)
    specs = text.geneval_prompts(per_tag, seed=seed + 1, cfg=world, split=split)
    order = [specs[t * per_tag + i] for i in range(per_tag) for t in range(6)][: int(n)]
    return [{"prompt": s["prompt"], "tag": s["tag"], "image": text.scene_for_prompt(s, k, world)["image"]}
            for k, s in enumerate(order)]


def generation_shares(run, rows: Sequence[Mapping[str, Any]], *, batch_size: int = 16) -> dict[str, Any]:
    """Per-layer share of attention from the image-code positions to prompt words by kind,
    teacher-forced on the ground-truth codes of each row's image (rows: {prompt, image})."""
    b = run.builder
    groups_all = WORD_KINDS + _GEN_EXTRA
    n_codes = b.layout.num_codes

    def make(chunk):
        exs, groups = [], []
        for row in chunk:
            ex = b.text_to_image(row["prompt"], np.asarray(row["image"], np.uint8), drop=False)
            gen_start = int(ex["gen_start"])
            kinds = token_kinds(run.tokenizer, row["prompt"])[: gen_start - 2]
            g = np.full(ex["tokens"].shape, -1, np.int32)
            g[1:1 + len(kinds)] = [groups_all.index(k) for k in kinds]
            g[0] = groups_all.index("bos")
            g[gen_start - 1] = groups_all.index("boi")
            g[gen_start:gen_start + n_codes] = groups_all.index("image")
            exs.append(ex)
            groups.append(g)
        stack = {k: np.stack([e[k] for e in exs]) for k in ("tokens", "attn_mask", "gen_start", "target_image")}
        qmask = np.zeros_like(stack["tokens"])
        for r, e in enumerate(exs):
            s = int(e["gen_start"])
            qmask[r, s:s + n_codes] = 1
        inputs = {"tokens": stack["tokens"], "attn_mask": stack["attn_mask"],
                  "codes": run.encode_images(stack["target_image"]), "gen_start": stack["gen_start"]}
        return run.with_empty_spans(inputs), qmask, np.stack(groups)

    shares = _shares(run, rows, make, len(groups_all), batch_size)  # [D, G], rows sum to 1
    prompt = shares[:, : len(WORD_KINDS)]
    total = prompt.sum(1)
    out: dict[str, Any] = {k: (prompt[:, i] / np.maximum(total, 1e-12)).tolist() for i, k in enumerate(WORD_KINDS)}
    out.update(prompt_total=total.tolist(), **{g: shares[:, groups_all.index(g)].tolist() for g in _GEN_EXTRA},
               layers=[f"llm_{i + 1}" for i in range(shares.shape[0])], num_rows=len(rows),
               method="teacher-forced on ground-truth VQ codes of a scene that satisfies the prompt")
    return out
