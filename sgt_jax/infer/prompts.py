"""Inference prompts as right-padded UMM input batches, laid out by the training sequence builder.

Every prefix comes from `sequences.SequenceBuilder`'s own prefix functions (`t2i_prefix`,
`proxy_prefix`, `understanding_prefix`), and over-long text is cut by its `_fit` rule with the same
reserved room as in training, so a prompt seen at sampling time is token-for-token the prompt part
of a training row. The unconditional (CFG) twin of a generation prompt is the builder's
`cond=False` prefix: the condition replaced by pads of the same length, keeping `<bos>`, the image
span and `<boi>` — the row the training-time condition dropout produced.

A batch is a dict of numpy arrays: `tokens` int32[B, L], `attn_mask` int32[B, L] (1 real, 0 right
padding) and, for prompts with an input image, `vit_images` float32[B, S, S, 3] in [-1, 1] and
`vit_start` int32[B]. L is the longest row rounded up to `multiple` (fewer distinct compiled shapes).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sgt_jax.data import sequences
from sgt_jax.data import text as text_lib

Batch = dict[str, np.ndarray]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, *, length: int | None = None,
              multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists to one length -> (tokens int32[B, L], attn_mask int32[B, L])."""
    longest = max(len(r) for r in rows)
    if length is None:
        length = -(-longest // multiple) * multiple
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest prompt ({longest} tokens)")
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return tokens, mask


def _per_row(value: Any, n: int, name: str) -> list:
    if isinstance(value, (str, bytes)) or value is None:
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"got {len(value)} {name} for {n} rows")
    return value


def _images(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    return [np.asarray(im, np.uint8) for im in images]


def _ids(builder: sequences.SequenceBuilder, text: str) -> list[int]:
    return builder.encode(text)


def _batch(builder: sequences.SequenceBuilder, rows, *, length, multiple, images=None, vit_start=None) -> Batch:
    tokens, mask = pad_batch(rows, builder.ids.pad, length=length, multiple=multiple)
    out = {"tokens": tokens, "attn_mask": mask}
    if images is not None:
        size = builder.layout.vit_image_size
        out["vit_images"] = np.stack([sequences.vit_pixels(im, size) for im in images]).astype(np.float32)
        out["vit_start"] = np.asarray(vit_start, np.int32)
    return out


# ---------------------------------------------------------------------------------------------
# text-to-image
# ---------------------------------------------------------------------------------------------
def t2i_prefixes(builder: sequences.SequenceBuilder, prompts: Sequence[str], *, cond: bool = True,
                 length: int | None = None, multiple: int = 8) -> Batch:
    """`<bos> prompt <boi>` rows (prompt -> pads when cond=False); codes follow each row's end."""
    fixed = len(builder.t2i_prefix([])) + builder.layout.num_codes + 1  # + the closing <eoi>
    rows = [builder.t2i_prefix(builder._fit(fixed, _ids(builder, p), keep="head")[0], cond=cond) for p in prompts]
    return _batch(builder, rows, length=length, multiple=multiple)


def t2i_pair(builder: sequences.SequenceBuilder, prompts: Sequence[str], **kw) -> tuple[Batch, Batch]:
    """(conditional, unconditional) t2i batches for classifier-free guidance."""
    return t2i_prefixes(builder, prompts, cond=True, **kw), t2i_prefixes(builder, prompts, cond=False, **kw)


# ---------------------------------------------------------------------------------------------
# SGT proxy (segmentation, depth, ...): image + instruction -> target codes
# ---------------------------------------------------------------------------------------------
def default_instruction(proxy: str = "segmentation") -> str:
    """The first training instruction of a proxy (a fixed, in-distribution choice)."""

    return text_lib.INSTRUCTIONS[proxy][0]


def proxy_prefixes(builder: sequences.SequenceBuilder, images, instructions: str | Sequence[str] | None = None, *,
                   proxy: str = "segmentation", cond: bool = True, length: int | None = None,
                   multiple: int = 8) -> Batch:
    """`<bos> <img> [ViT] </img> instruction <boi>` rows; the image is kept when cond=False."""
    images = _images(images)
    instructions = [i if i is not None else default_instruction(proxy)
                    for i in _per_row(instructions, len(images), "instructions")]
    fixed = len(builder.proxy_prefix([])[0]) + builder.layout.num_codes + 1
    rows, starts = [], []
    for ins in instructions:
        ids = builder._fit(fixed, _ids(builder, ins), keep="head")[0]
        row, vit_start = builder.proxy_prefix(ids, cond=cond)
        rows.append(row)
        starts.append(vit_start)
    return _batch(builder, rows, length=length, multiple=multiple, images=images, vit_start=starts)


def proxy_pair(builder: sequences.SequenceBuilder, images, instructions=None, **kw) -> tuple[Batch, Batch]:
    """(conditional, unconditional) proxy batches: same image, instruction dropped in the second."""
    return (proxy_prefixes(builder, images, instructions, cond=True, **kw),
            proxy_prefixes(builder, images, instructions, cond=False, **kw))


# ---------------------------------------------------------------------------------------------
# understanding (VQA / captions)
# ---------------------------------------------------------------------------------------------
def vqa_prefixes(builder: sequences.SequenceBuilder, images, questions: str | Sequence[str], *,
                 answer_room: int = 0, length: int | None = None, multiple: int = 8) -> Batch:
    """`<bos> <img> [ViT] </img> question` rows; the answer is generated after each row's end.

    A question longer than the row allows (max_seq_len minus the image span and `answer_room`
    tokens for the answer) keeps its tail, as in training (the ask sits at the end).
    """
    images = _images(images)
    questions = _per_row(questions, len(images), "questions")
    head, vit_start = builder.understanding_prefix("")  # <bos> <img> [ViT] </img>, nothing after
    rows = [head + builder._fit(len(head) + answer_room, _ids(builder, q), keep="tail")[0] for q in questions]
    return _batch(builder, rows, length=length, multiple=multiple, images=images,
                  vit_start=[vit_start] * len(rows))


def decode_text(tokenizer, tokens, eos_id: int) -> list[str]:
    """Generated ids [B, T] -> strings cut before the first eos (answers carry a leading space)."""
    out = []
    for row in np.asarray(tokens):
        row = [int(t) for t in row]
        if eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


# ---------------------------------------------------------------------------------------------
# Janus / Janus-Pro conversation format (converted checkpoints, `sgt_jax/convert/janus.py`)
# ---------------------------------------------------------------------------------------------
# DeepSeek's "deepseek" template as Janus uses it: [system + "\n\n"] "<|User|>: " message "\n\n"
# "<|Assistant|>:"; the tokenizer adds BOS in front. Special ids (`ids`: bos, eos, pad, boi, eoi,
# image) come from the tokenizer (`convert.janus.special_ids`), never from constants.
JANUS_USER, JANUS_ASSISTANT = "<|User|>", "<|Assistant|>"
JANUS_BACKGROUND = (127, 127, 127)  # int(0.5 * 255): the reference pads with its image mean
UNCOND_MODES = ("pad", "pad_prompt")


def _encode(tokenizer, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


def janus_pixels(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3] in [-1, 1] as Janus's processor does: bicubic
    resize of the long side to `size`, pad to a square centred on the reference background, then
    mean 0.5 / std 0.5."""
    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        from PIL import Image

        long, floor = max(h, w), min(14, size)  # the reference's min_size 14
        nh, nw = max(round(h * size / long), floor), max(round(w * size / long), floor)
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
        square = np.empty((size, size, 3), np.uint8)
        square[:] = JANUS_BACKGROUND
        top, left = (size - nh) // 2, (size - nw) // 2
        square[top:top + nh, left:left + nw] = resized
        image = square
    return (image.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def janus_generation(tokenizer, ids: dict, texts: Sequence[str], *, system: str = "", uncond: str = "pad",
                     length: int | None = None, multiple: int = 8) -> tuple[Batch, Batch]:
    """(cond, uncond) text-to-image prompts `<bos> <|User|>: text\\n\\n<|Assistant|>: <boi>`.

    `uncond` picks the CFG unconditional row (`SamplingConfig.uncond`): "pad" = the reference's,
    every token between `<bos>` and the final `<boi>` replaced by pad (still attended); "pad_prompt"
    = only the user text replaced, the conversation template kept.
    """
    if uncond not in UNCOND_MODES:
        raise ValueError(f"uncond={uncond!r} is not allowed; allowed: {list(UNCOND_MODES)}")
    head = (system + "\n\n" if system else "") + f"{JANUS_USER}: "
    tail = f"\n\n{JANUS_ASSISTANT}:"
    cond_rows, uncond_rows = [], []
    for text in texts:
        h, t, p = _encode(tokenizer, head), _encode(tokenizer, tail), _encode(tokenizer, text)
        body = h + p + t
        cond_rows.append([ids["bos"]] + body + [ids["boi"]])
        blank = [ids["pad"]] * len(body) if uncond == "pad" else h + [ids["pad"]] * len(p) + t
        uncond_rows.append([ids["bos"]] + blank + [ids["boi"]])
    out = []
    for rows in (cond_rows, uncond_rows):
        tokens, mask = pad_batch(rows, ids["pad"], length=length, multiple=multiple)
        out.append({"tokens": tokens, "attn_mask": mask})
    return out[0], out[1]


def janus_understanding(tokenizer, ids: dict, images, questions: str | Sequence[str], num_image_tokens: int, *,
                        image_size: int | None = None, system: str = "", length: int | None = None,
                        multiple: int = 8) -> Batch:
    """`<bos> [system] <|User|>: <boi> [image x N] <eoi>\\nquestion\\n\\n<|Assistant|>:` rows (the answer
    follows each row's end); N = 576 at Janus-Pro's 384 px. Images go through `janus_pixels`."""
    images = _images(images)
    questions = _per_row(questions, len(images), "questions")
    size = image_size or images[0].shape[0]
    head = _encode(tokenizer, (system + "\n\n" if system else "") + f"{JANUS_USER}: ")
    span = [ids["boi"]] + [ids["image"]] * num_image_tokens + [ids["eoi"]]
    rows = [[ids["bos"]] + head + span + _encode(tokenizer, f"\n{q}\n\n{JANUS_ASSISTANT}:") for q in questions]
    tokens, mask = pad_batch(rows, ids["pad"], length=length, multiple=multiple)
    return {"tokens": tokens, "attn_mask": mask,
            "vit_images": np.stack([janus_pixels(im, size) for im in images]).astype(np.float32),
            "vit_start": np.full((len(rows),), 1 + len(head) + 1, np.int32)}
