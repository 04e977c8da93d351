"""CV-Bench analogue: multiple-choice count, 2D relation, depth order and relative distance.

Items come from `sgt_jax.data.text.mcq_questions` on Shapes World scenes of one split (a fixed,
seeded set, so every run answers the same items). Two ways to read the model's answer:

* `likelihood` (default): each choice's answer is the training answer for that letter (" B" +
  <eos>, `SequenceBuilder.answer_ids`) after the training prompt layout (`prompts.vqa_prefixes`),
  scored by the summed log-prob of those tokens given image + question; the best-scoring choice is
  the answer. Robust (no parsing, no failure to answer) and cheap (one cached prompt forward per
  item, then a few single-token steps per choice).
* `generate`: greedy decoding with the sampler's KV cache, parsed by `sgt_jax.eval.mcq`; answers that
  name no single choice count as wrong. Closer to how CV-Bench scores a chat model.

Scores: accuracy per task, `mean` = unweighted mean of the four tasks (CV-Bench style), `overall`
over all items, and the number of items per task.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.data import shapes_world as sw
from sgt_jax.data import text
from sgt_jax.eval import mcq

CVBENCH_TASKS: tuple[str, ...] = ("count", "relation", "depth_order", "distance")
_LETTERS = "ABCDEFGH"
_ITEM_SALT = 0x4356


def mcq_items(world: sw.WorldConfig, split: str, per_task: int, seed: int = 0,
              tasks: Sequence[str] = CVBENCH_TASKS, max_scenes: int | None = None) -> list[dict]:
    """Up to `per_task` items per task from consecutive scenes of `split` (scene seeds 0, 1, ...).

    Each item: {task, question, choices, answer, image uint8[H,W,3], scene_seed}. Deterministic in
    (world, split, per_task, seed); a scene contributes at most one item per task."""
    need = {t: int(per_task) for t in tasks}
    out: list[dict] = []
    limit = max_scenes if max_scenes is not None else 50 * max(1, int(per_task)) + 50
    for i in range(limit):
        if all(v <= 0 for v in need.values()):
            break
        scene = sw.generate_scene(i, world, split)
        rng = np.random.default_rng([_ITEM_SALT, sw.SPLITS.index(split), int(seed), i])
        for q in text.mcq_questions(scene, rng):
            if need.get(q["task"], 0) > 0:
                need[q["task"]] -= 1
                out.append({**q, "image": np.asarray(scene["image"], np.uint8), "scene_seed": i})
    return out


@partial(jax.jit, static_argnums=0)
def _choice_logprobs(model, params, prefix: dict, choices: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed log-prob of each choice's answer tokens after its row's prompt.

    prefix: right-padded `<bos> <img> [V] </img> question` rows; choices int32 [B, C, T] answer ids
    (letter + <eos>), mask [B, C, T] (1 = real token). The prompt is prefilled once into the KV cache
    and every choice is teacher-forced from that same cache (cached = uncached, tested in the
    sampler), so scoring C choices costs one prompt forward plus C x T single-token steps."""
    from sgt_jax.models import umm as umm_lib

    b, _, t = choices.shape
    cache = umm_lib.init_cache(model.cfg, b, prefix["tokens"].shape[1] + t)
    out, cache = model.apply({"params": params}, prefix, cache, method=umm_lib.UMM.prefill)
    first = jax.nn.log_softmax(out["text_logits"].astype(jnp.float32), axis=-1)
    zeros = jnp.zeros((b,), jnp.int32)

    def score(args):
        toks, m = args  # [B, T]
        total = jnp.take_along_axis(first, toks[:, :1], axis=1)[:, 0] * m[:, 0]

        def step(carry, k):
            c, acc = carry
            o, c = model.apply({"params": params}, {"tokens": jax.lax.dynamic_index_in_dim(toks, k, axis=1, keepdims=False), "codes": zeros, "is_code": zeros,
                                                    "gen": zeros}, c, method=umm_lib.UMM.decode_step)
            lp = jax.nn.log_softmax(o["text_logits"].astype(jnp.float32), axis=-1)
            nxt_tok = jax.lax.dynamic_index_in_dim(toks, k + 1, axis=1, keepdims=True)
            nxt = jnp.take_along_axis(lp, nxt_tok, axis=1)[:, 0]
            return (c, acc + nxt * jax.lax.dynamic_index_in_dim(m, k + 1, axis=1, keepdims=False)), None

        (_, total), _ = jax.lax.scan(step, (cache, total), jnp.arange(t - 1))
        return total

    per_choice = jax.lax.map(score, (jnp.swapaxes(choices, 0, 1), jnp.swapaxes(mask, 0, 1)))  # [C, B]
    valid = jnp.swapaxes(mask[:, :, 0], 0, 1) > 0
    return jnp.swapaxes(jnp.where(valid, per_choice, -jnp.inf), 0, 1)


def choice_logprobs(run, items: Sequence[Mapping[str, Any]], batch_size: int = 16) -> list[np.ndarray]:
    """Per item, the log-likelihood of each choice's answer (" <letter>" + <eos>, exactly the
    training answer) given image + question."""
    from sgt_jax.infer import prompts

    b = run.builder
    answers = [b.answer_ids(letter) + [b.ids.eos] for letter in _LETTERS]
    n_choices = max(len(item["choices"]) for item in items)
    t = max(len(a) for a in answers[:n_choices])
    length = b.layout.max_seq_len - t

    def make(chunk):
        prefix = prompts.vqa_prefixes(b, [i["image"] for i in chunk], [text.format_mcq(i)[0] for i in chunk],
                                      answer_room=t, length=length)
        toks = np.full((len(chunk), n_choices, t), b.ids.pad, np.int32)
        mask = np.zeros_like(toks)
        for r, item in enumerate(chunk):
            for j in range(len(item["choices"])):
                toks[r, j, :len(answers[j])] = answers[j]
                mask[r, j, :len(answers[j])] = 1
        return prefix, toks, mask

    fn = partial(_choice_logprobs, run.model)
    scores = run.map_batches(lambda p, x: fn(p, *x), make, list(items), batch_size)
    return [np.asarray(s[:len(item["choices"])]) for s, item in zip(np.asarray(scores), items, strict=True)]


def answer_by_likelihood(run, items: Sequence[Mapping[str, Any]], batch_size: int = 16) -> list[int]:
    """Index of the most likely choice per item."""
    return [int(np.argmax(s)) for s in choice_logprobs(run, items, batch_size)]


def answer_by_generation(run, items: Sequence[Mapping[str, Any]], batch_size: int = 16,
                         max_new_tokens: int = 6) -> list[str]:
    """Greedy answers (decoded text) from the sampler's cached text generation."""
    prompts = [text.format_mcq(item)[0] for item in items]
    images = [item["image"] for item in items]
    return run.generate_answers(prompts, images, max_new_tokens=max_new_tokens, batch_size=batch_size)


def score_predictions(items: Sequence[Mapping[str, Any]], picks: Sequence[int | None],
                      tasks: Sequence[str] = CVBENCH_TASKS) -> dict[str, Any]:
    """Accuracy per task, `mean` over the tasks present, `overall` over items, counts in `n`."""
    per: dict[str, list[bool]] = {}
    for item, pick in zip(items, picks, strict=True):
        per.setdefault(item["task"], []).append(pick is not None and int(pick) == int(item["answer"]))
    out: dict[str, Any] = {t: float(np.mean(per[t])) for t in tasks if per.get(t)}
    present = [t for t in tasks if t in out]
    out["mean"] = float(np.mean([out[t] for t in present])) if present else float("nan")
    flat = [x for t in present for x in per[t]]
    out["overall"] = float(np.mean(flat)) if flat else float("nan")
    out["n"] = {t: len(per.get(t, [])) for t in tasks}
    return out


def evaluate(run, world: sw.WorldConfig, split: str, *, per_task: int, method: str = "likelihood",
             seed: int = 0, batch_size: int = 16) -> dict[str, Any]:
    """CV-Bench analogue on one split. With method="both" the likelihood scores are the headline and
    the generation scores sit under `generate`."""
    if method not in ("likelihood", "generate", "both"):
        raise ValueError(f"config field 'eval.umm.mcq_method' = {method!r} is not allowed; "
                         "allowed: ['likelihood', 'generate', 'both']")
    items = mcq_items(world, split, per_task, seed)
    res: dict[str, Any] = {}
    if method in ("likelihood", "both"):
        res = score_predictions(items, answer_by_likelihood(run, items, batch_size))
        res["method"] = "likelihood"
    if method in ("generate", "both"):
        answers = answer_by_generation(run, items, batch_size)
        picks = [mcq.parse_answer(a, item["choices"]) for a, item in zip(answers, items, strict=True)]
        gen = score_predictions(items, picks)
        gen["unparsed"] = float(np.mean([p is None for p in picks])) if picks else float("nan")
        gen["method"] = "generate"
        gen["examples"] = [{"question": text.format_mcq(i)[0], "answer": a} for i, a in zip(items[:3], answers[:3], strict=True)]
        if method == "generate":
            res = gen
        else:
            res["generate"] = gen
    return res
