"""The one place a training sample becomes a fixed-length token sequence with loss masks.

Every task kind is laid out here, so the training stage, the sampler and the
evaluators agree on where the image spans sit and which positions carry a loss:

    understanding  <bos> <img> [V ViT slots] </img> question answer <eos>        text CE on answer+<eos>
    text-to-image  <bos> prompt <boi> [N code slots] <eoi>                       code CE on the N codes
    SGT proxy      <bos> <img> [V ViT slots] </img> instruction <boi> [N code slots] <eoi>   code CE

Loss arrays are indexed by the position whose *output* is scored (next-token prediction):
`text_loss_weight[p]` weights the text CE of predicting `tokens[p+1]` from position p (the configured
text weight, 1.5 by default, on answer tokens and the closing <eos>); `gen_loss_mask[p]` is 1 where
`p+1` is a code slot, i.e. from `<boi>` to the second-to-last code. Ids written at ViT and code slots
are the pad id; the model replaces those embeddings (UMM contract), so their value never matters.

Condition dropout for classifier-free guidance (t2i prompt, proxy instruction; probability
`cfg.data.cond_dropout`) follows Janus: the condition's tokens are *replaced by pad tokens of the same
length*, keeping <bos>, the image span and <boi>, and they stay attended (attn_mask 1). The sampler's
unconditional row is built by the same function (`t2i_prefix(..., cond=False)`), so training and
CFG sampling see the same unconditional context. The input image of a proxy sample is never dropped.

Arrays returned per example (numpy, fixed shapes; grain stacks them into a batch):
  tokens int32[L], attn_mask int32[L] (1 real / 0 right padding), text_loss_weight float32[L],
  gen_loss_mask float32[L], vit_image float32[S,S,3] in [-1,1] (zeros when absent), vit_start int32
  (-1 = none), target_image uint8[H,W,3] (tokenized by the frozen VQ inside the train step; zeros
  when absent), gen_start int32 (-1 = none), task int32 (index into `sgt_jax.config.TASKS`),
  truncated int32 (1 when text had to be cut to fit L).
With `data.packing` several samples share a row (`sgt_jax/data/packing.py`): the per-example
fields then get a leading slot axis of `data.packing_max_segments`, plus `segment_ids` / `positions`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sgt_jax.config import PROXIES, ROW_TOKENS, TASKS, umm_dims
from sgt_jax.data import render, text
from sgt_jax.data import shapes_world as sw
from sgt_jax.data.mixture import Mixture
from sgt_jax.data.tokenizer import special_token_ids

Example = dict[str, np.ndarray]
# A per-task transform: (record, per-example numpy Generator) -> example. Deterministic given the rng.
TaskTransform = Callable[[Mapping[str, Any], np.random.Generator], Example]

CAPTION_QUESTION = "Describe the image."
# Proxies whose targets are flat-colour label maps: resample them without interpolation.
_LABEL_PROXIES = ("segmentation", "semantic", "edge")


def task_id(name: str) -> int:
    """Index of a task name in `sgt_jax.config.TASKS` (the `task` field of every example)."""
    return TASKS.index(name)


# ---------------------------------------------------------------------------------------------
# special ids and static sizes
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the structural tokens. Built from a Hugging Face tokenizer with `from_tokenizer`."""

    bos: int
    eos: int
    pad: int
    img: int
    img_end: int
    boi: int
    eoi: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        """Read ids from a Hugging Face tokenizer with `data.tokenizer.special_token_ids` (one rule for
        BOS/pad fallbacks: a tokenizer without BOS (Qwen2) uses EOS as BOS, without pad EOS as pad)."""

        ids = special_token_ids(tok)
        return cls(**{f.name: int(ids[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static sizes shared by the data, the model inputs and the sampler."""

    max_seq_len: int
    num_vit_tokens: int
    vit_image_size: int
    num_codes: int
    image_size: int  # generation (VQ) image side
    text_weight: float = 1.5
    gen_weight: float = 1.0
    cond_dropout: float = 0.1
    caption_fraction: float = 0.25
    world: str = "full"  # Shapes World preset (`data.world`): which shapes / colours questions ask about

    @classmethod
    def from_config(cls, cfg) -> "Layout":
        """Sizes from a finalized experiment config (`config.umm_dims`, `data.max_seq_len`)."""
        d = umm_dims(cfg)
        return cls(max_seq_len=int(cfg.data.max_seq_len), num_vit_tokens=d["num_vit_tokens"],
                   vit_image_size=d["vit_image_size"], num_codes=d["num_codes"], image_size=d["image_size"],
                   text_weight=float(cfg.data.text_loss_weight), gen_weight=float(cfg.data.gen_loss_weight),
                   cond_dropout=float(cfg.data.cond_dropout), caption_fraction=float(cfg.data.caption_fraction),
                   world=str(cfg.data.get("world", "full")))


def example_spec(layout: Layout, max_segments: int = 0) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-example (shape, dtype) of every array a row carries; the stage's `dummy_batch` uses it.
    `max_segments` > 0: a packed row (`data/packing.py`), with `segment_ids` / `positions` and one
    slot per example for the per-example fields (`packing.SLOT_KEYS`)."""
    s, h = layout.vit_image_size, layout.image_size
    L = layout.max_seq_len
    spec = {"tokens": ((L,), np.int32), "attn_mask": ((L,), np.int32), "text_loss_weight": ((L,), np.float32),
            "gen_loss_mask": ((L,), np.float32), "vit_image": ((s, s, 3), np.float32), "vit_start": ((), np.int32),
            "target_image": ((h, h, 3), np.uint8), "gen_start": ((), np.int32), "task": ((), np.int32),
            "truncated": ((), np.int32)}
    if max_segments > 0:
        from sgt_jax.data.packing import SLOT_KEYS

        spec = {k: (((max_segments,) + shape) if k in SLOT_KEYS else shape, dtype)
                for k, (shape, dtype) in spec.items()}
        spec.update(segment_ids=((L,), np.int32), positions=((L,), np.int32))
    return spec


# ---------------------------------------------------------------------------------------------
# image helpers
# ---------------------------------------------------------------------------------------------
def _resize(image: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    from PIL import Image  # only needed when sizes differ (real data)

    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), resample))


def vit_pixels(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> float32 [size,size,3] in [-1,1] (SigLIP/Janus normalisation)."""
    image = _resize(np.asarray(image), size, nearest=False)
    return (image.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def _target(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    return np.ascontiguousarray(_resize(np.asarray(image, np.uint8), size, nearest), dtype=np.uint8)


class HFEncode:
    """`tokenizer.encode(text, add_special_tokens=False)` as a picklable callable (grain worker
    processes receive the transforms by pickling)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# the builder
# ---------------------------------------------------------------------------------------------
class SequenceBuilder:
    """Lays out the three task kinds on a fixed-length row. `encode(text) -> list[int]` must not add
    special tokens (e.g. `HFEncode(tokenizer)`)."""

    def __init__(self, layout: Layout, ids: SpecialIds, encode: Callable[[str], Sequence[int]]):
        self.layout = layout
        self.ids = ids
        self._encode = encode

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._encode(text)]

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "SequenceBuilder":
        return cls(Layout.from_config(cfg), SpecialIds.from_tokenizer(tokenizer), HFEncode(tokenizer))

    # -- prefixes shared with the sampler / evaluators --------------------------------------
    def vit_span(self) -> list[int]:
        """`<img> [V slots] </img>`; the ViT span starts one position after the returned list's start."""
        return [self.ids.img] + [self.ids.pad] * self.layout.num_vit_tokens + [self.ids.img_end]

    def t2i_prefix(self, prompt: str | Sequence[int], cond: bool = True) -> list[int]:
        """`<bos> prompt <boi>`; with cond=False the prompt becomes pads of the same length (CFG row).
        The first code is generated at position len(prefix)."""
        p = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not cond:
            p = [self.ids.pad] * len(p)
        return [self.ids.bos] + p + [self.ids.boi]

    def proxy_prefix(self, instruction: str | Sequence[int], cond: bool = True) -> tuple[list[int], int]:
        """`<bos> <img> [V] </img> instruction <boi>` -> (ids, vit_start); codes start at len(ids)."""
        p = self.encode(instruction) if isinstance(instruction, str) else list(instruction)
        if not cond:
            p = [self.ids.pad] * len(p)
        return [self.ids.bos] + self.vit_span() + p + [self.ids.boi], 2

    def understanding_prefix(self, question: str) -> tuple[list[int], int]:
        """`<bos> <img> [V] </img> question` -> (ids, vit_start); the answer is generated after it."""
        return [self.ids.bos] + self.vit_span() + self.encode(question), 2

    # -- full training rows --------------------------------------------------------------
    def _row(self, tokens: list[int], loss_targets: list[float], code_slot: list[bool], *, task: str,
             vit_image: np.ndarray | None, vit_start: int, target_image: np.ndarray | None, gen_start: int,
             truncated: bool) -> Example:
        lay, n = self.layout, len(tokens)
        if n > lay.max_seq_len:
            raise AssertionError("row longer than max_seq_len after truncation")
        L = lay.max_seq_len
        out_tokens = np.full(L, self.ids.pad, np.int32)
        out_tokens[:n] = tokens
        attn = np.zeros(L, np.int32)
        attn[:n] = 1
        # Shift by one: the weight at p scores the prediction of token p+1.
        text_w = np.zeros(L, np.float32)
        text_w[: n - 1] = np.asarray(loss_targets[1:], np.float32)
        gen_m = np.zeros(L, np.float32)
        gen_m[: n - 1] = np.asarray(code_slot[1:], np.float32)
        s = lay.vit_image_size
        return {
            "tokens": out_tokens,
            "attn_mask": attn,
            "text_loss_weight": text_w,
            "gen_loss_mask": gen_m,
            "vit_image": vit_pixels(vit_image, s) if vit_image is not None else np.zeros((s, s, 3), np.float32),
            "vit_start": np.int32(vit_start),
            "target_image": (target_image if target_image is not None
                             else np.zeros((lay.image_size, lay.image_size, 3), np.uint8)),
            "gen_start": np.int32(gen_start),
            "task": np.int32(task_id(task)),
            "truncated": np.int32(truncated),
        }

    def _fit(self, fixed: int, text: list[int], keep: str) -> tuple[list[int], bool]:
        """Trim `text` so fixed + len(text) <= L; keep='tail' keeps the end (questions end in the ask)."""
        room = self.layout.max_seq_len - fixed
        if room < 0:
            raise ValueError(
                f"config field 'data.max_seq_len' = {self.layout.max_seq_len} is too small: the image spans "
                f"and structural tokens alone need {fixed} positions")
        if len(text) <= room:
            return text, False
        return (text[len(text) - room:] if keep == "tail" else text[:room]), True

    def answer_ids(self, answer: str) -> list[int]:
        """Answer tokens as they follow the question: encoded with a leading space, so a byte-level
        BPE sees " A" exactly as in running text ("... Answer: A")."""
        return self.encode(" " + answer.lstrip())

    fit = _fit  # public name: the prompt builders of the sampler cut text by the same rule

    def understanding(self, image: np.ndarray, question: str, answer: str) -> Example:
        """VQA / caption row: loss (text weight) on the answer tokens and the closing <eos>."""
        V = self.layout.num_vit_tokens
        q, a = self.encode(question), self.answer_ids(answer) + [self.ids.eos]
        fixed = ROW_TOKENS["understanding"] + V
        a, cut_a = self._fit(fixed, a, keep="head")
        q, cut_q = self._fit(fixed + len(a), q, keep="tail")
        tokens = [self.ids.bos] + self.vit_span() + q + a
        w = [0.0] * (len(tokens) - len(a)) + [self.layout.text_weight] * len(a)
        return self._row(tokens, w, [False] * len(tokens), task="understanding", vit_image=image, vit_start=2,
                         target_image=None, gen_start=-1, truncated=cut_a or cut_q)

    def conversation(self, image: np.ndarray, turns: Sequence[tuple[str, str]]) -> Example:
        """Multi-turn VQA on one row: `<bos> <img> [V] </img> q1 a1 <eos> q2 a2 <eos> ...`, loss (text
        weight) on every answer and its <eos>, none on the questions. One turn is exactly
        `understanding`; turns that do not fit after the first are dropped (truncated = 1)."""
        if not turns:
            raise ValueError("conversation needs at least one (question, answer) turn")
        first = self.understanding(image, turns[0][0], turns[0][1])
        if len(turns) == 1 or first["truncated"]:
            return first
        V = self.layout.num_vit_tokens
        tokens, weights, cut = [self.ids.bos] + self.vit_span(), [0.0] * (3 + V), False
        for question, answer in turns:
            q, a = self.encode(question), self.answer_ids(answer) + [self.ids.eos]
            if len(tokens) + len(q) + len(a) > self.layout.max_seq_len:
                cut = True
                break
            tokens += q + a
            weights += [0.0] * len(q) + [self.layout.text_weight] * len(a)
        return self._row(tokens, weights, [False] * len(tokens), task="understanding", vit_image=image, vit_start=2,
                         target_image=None, gen_start=-1, truncated=cut)

    def text_to_image(self, prompt: str, target: np.ndarray, drop: bool) -> Example:
        """`<bos> prompt <boi> [N codes] <eoi>`; loss on the codes. `drop`: CFG unconditional row."""
        N = self.layout.num_codes
        p, cut = self._fit(ROW_TOKENS["t2i"] + N, self.encode(prompt), keep="head")
        prefix = self.t2i_prefix(p, cond=not drop)
        return self._gen_row(prefix, target, task="t2i", vit_image=None, vit_start=-1, truncated=cut)

    def proxy(self, proxy: str, image: np.ndarray, instruction: str, target: np.ndarray, drop: bool,
              nearest: bool = False) -> Example:
        """SGT row: image via the ViT only, instruction (dropped -> pads), target codes with loss."""
        V, N = self.layout.num_vit_tokens, self.layout.num_codes
        ins, cut = self._fit(ROW_TOKENS["proxy"] + V + N, self.encode(instruction), keep="head")
        prefix, vit_start = self.proxy_prefix(ins, cond=not drop)
        return self._gen_row(prefix, target, task=f"proxy_{proxy}", vit_image=image, vit_start=vit_start,
                             truncated=cut, nearest=nearest)

    def _gen_row(self, prefix, target, *, task, vit_image, vit_start, truncated, nearest=False) -> Example:
        N = self.layout.num_codes
        tokens = prefix + [self.ids.pad] * N + [self.ids.eoi]
        slot = [False] * len(prefix) + [True] * N + [False]
        return self._row(tokens, [0.0] * len(tokens), slot, task=task, vit_image=vit_image, vit_start=vit_start,
                         target_image=_target(target, self.layout.image_size, nearest), gen_start=len(prefix),
                         truncated=truncated)


# ---------------------------------------------------------------------------------------------
# text formats
# ---------------------------------------------------------------------------------------------
def format_mcq(question: Mapping[str, Any]) -> tuple[str, str]:
    """A multiple-choice item -> (prompt, answer letter): "Q? (A) x (B) y Answer:" and "A".

    Defined in `text.py` (the tokenizer corpus is written in the same layout); re-exported here so
    training and the understanding evaluator format items identically."""

    return text.format_mcq(question)


# ---------------------------------------------------------------------------------------------
# per-task transforms for the grain mixture
# ---------------------------------------------------------------------------------------------
def _image(record: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(record["image"], np.uint8)


_world = functools.lru_cache(maxsize=None)(sw.WorldConfig.named)  # one WorldConfig per preset name


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


class _Transform:
    """Base of the per-task transforms: plain objects (picklable), `(record, rng) -> example`."""

    def __init__(self, builder: SequenceBuilder):
        self.builder = builder

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> Example:
        raise NotImplementedError


class UnderstandingTransform(_Transform):
    """Record -> understanding row. Records with `turns` (multi-turn VQA) become one conversation row,
    records with `question`/`answer` are used as is;
    Shapes World scenes draw a caption (prob `caption_fraction`) or one of their MCQ items."""

    def __call__(self, record, rng):
        b = self.builder
        if "turns" in record:  # real multi-turn VQA (e.g. LLaVA-OneVision)
            return b.conversation(_image(record), record["turns"])
        if "question" in record and "answer" in record:
            return b.understanding(_image(record), str(record["question"]), str(record["answer"]))
        world = _world(b.layout.world)
        questions = [] if rng.random() < b.layout.caption_fraction else text.mcq_questions(record, rng, world)
        if not questions:
            return b.understanding(_image(record), CAPTION_QUESTION, text.caption(record, rng))
        prompt, answer = format_mcq(_pick(rng, questions))
        return b.understanding(_image(record), prompt, answer)


class T2ITransform(_Transform):
    """Record -> text-to-image row; the prompt is `record['prompt']` or a true prompt of the scene."""

    def __call__(self, record, rng):
        drop = bool(rng.random() < self.builder.layout.cond_dropout)
        if "prompt" in record:
            prompt = str(record["prompt"])
        else:

            prompt = text.t2i_prompt(record, rng)
        return self.builder.text_to_image(prompt, _image(record), drop)


class ProxyTransform(_Transform):
    """Record -> SGT proxy row. A record with a pre-rendered `target` (real data, e.g. SAM-SGT masks)
    uses it; a Shapes World scene renders it with `render.render_target`. Instructions are drawn from
    `text.INSTRUCTIONS[proxy]`; the instruction is dropped with prob `cond_dropout`, the image never."""

    def __init__(self, builder: SequenceBuilder, proxy: str):
        super().__init__(builder)
        if proxy not in PROXIES:
            raise ValueError(f"unknown proxy {proxy!r}; allowed: {list(PROXIES)}")
        self.proxy = proxy
        self.nearest = proxy in _LABEL_PROXIES

    def __call__(self, record, rng):

        instruction = _pick(rng, text.INSTRUCTIONS[self.proxy])
        drop = bool(rng.random() < self.builder.layout.cond_dropout)
        if "target" in record:
            image, target = _image(record), np.asarray(record["target"], np.uint8)
        else:

            image, target = render.render_target(record, self.proxy, rng)
        return self.builder.proxy(self.proxy, image, instruction, target, drop, nearest=self.nearest)


def task_transform(builder: SequenceBuilder, task: str) -> TaskTransform:
    """The transform for one task name of `sgt_jax.config.TASKS`."""
    if task == "understanding":
        return UnderstandingTransform(builder)
    if task == "t2i":
        return T2ITransform(builder)
    if task.startswith("proxy_"):
        return ProxyTransform(builder, task[len("proxy_"):])
    raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")


def make_task_transforms(cfg, tokenizer) -> Mixture:
    """The run's `Mixture` (`data.mixture`) with one sequence transform per task, for the grain pipeline."""
    builder = SequenceBuilder.from_config(cfg, tokenizer)
    return Mixture.from_config(cfg, lambda task: task_transform(builder, task))
