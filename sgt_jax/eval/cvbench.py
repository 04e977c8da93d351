"""CV-Bench analogue: multiple-choice count, 2D relation, depth order and relative distance.

Items come from `sgt_jax.data.text.balanced_mcq_items` on Shapes World scenes of one split (a fixed,
seeded set, so every run answers the same items), with exact quotas: answer letters and answer values
are balanced, so every constant answer scores the chance rate, and the relation item always offers
left / right / above / below (the option set does not reveal the axis). Two ways to read the model's
answer:

* `likelihood` (default): each choice's answer is the training answer for that letter (" B" +
  <eos>, `SequenceBuilder.answer_ids`) after the training prompt layout (`prompts.vqa_prefixes`),
  scored by the summed log-prob of those tokens given image + question; the best-scoring choice is
  the answer. Robust (no parsing, no failure to answer) and cheap (one cached prompt forward per
  item, then a few single-token steps per choice).
* `generate`: greedy decoding with the sampler's KV cache, parsed by `sgt_jax.eval.mcq`; answers that
  name no single choice count as wrong. Closer to how CV-Bench scores a chat model.

Scores: accuracy per task, `mean` = unweighted mean of the four tasks (CV-Bench style), `overall`
over all items, and the number of items per task; next to them (so a number can be read):
* `chance` (mean of 1 / options), `ci` (Wilson 95%; the mean's from the per-task variances),
  `letters` (share of each letter the model picked);
* `blind`: the same items with the image replaced by flat grey, and `visual` per task: whether the
  sighted score beats the blind one (exact McNemar), i.e. whether the model uses the image at all;
* `circular`: MMBench CircularEval, each item asked once per rotation of its options and right only if
  right in every rotation (a constant letter scores 0; a uniform guesser (1/C)^C);
* `per_item`: picks per item (for paired tests between runs on the same items) and `items_digest`.
"""
from __future__ import annotations

import functools
import hashlib
import json
from functools import partial
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.data import shapes_world as sw
from sgt_jax.data import text
from sgt_jax.eval import mcq, stats

CVBENCH_TASKS: tuple[str, ...] = ("count", "relation", "depth_order", "distance")
_LETTERS = "ABCDEFGH"
_ITEM_SALT = 0x4356


GREY = 128  # the blind control's flat image value


def mcq_items(world: sw.WorldConfig, split: str, per_task: int, seed: int = 0,
              tasks: Sequence[str] = CVBENCH_TASKS, max_scenes: int | None = None) -> list[dict]:
    """`per_task` balanced items per task (`text.balanced_mcq_items`), each with its scene's image.

    Each item: {task, question, choices, answer, image uint8[H,W,3], scene_seed, cell}. Deterministic
    in (world, split, per_task, seed); a scene contributes at most one item per task."""
    items = _balanced(world, split, int(per_task), int(seed), tuple(tasks), max_scenes)
    images: dict[int, np.ndarray] = {}
    out = []
    for it in items:
        i = it["scene_seed"]
        if i not in images:
            images[i] = np.asarray(sw.generate_scene(i, world, split)["image"], np.uint8)
        out.append({**it, "image": images[i]})
    return out


@functools.lru_cache(maxsize=32)
def _balanced(world, split, per_task, seed, tasks, max_scenes):
    return tuple(text.balanced_mcq_items(world, split, per_task, seed, tasks, max_scenes))


def rotations(item: Mapping[str, Any]) -> list[dict]:
    """CircularEval: the item once per rotation of its options (rotation 0 = the item itself)."""
    c = len(item["choices"])
    return [{**item, "choices": list(item["choices"][r:]) + list(item["choices"][:r]),
             "answer": (int(item["answer"]) - r) % c, "rotation": r} for r in range(c)]


def blind(item: Mapping[str, Any]) -> dict:
    """The same item with its image replaced by flat grey."""
    return {**item, "image": np.full_like(np.asarray(item["image"]), GREY)}


def items_digest(items: Sequence[Mapping[str, Any]]) -> str:
    """A short fingerprint of the questions, options and answers (paired tests check it)."""
    h = hashlib.sha1()
    for it in items:
        h.update(json.dumps([it["task"], it["question"], list(it["choices"]), int(it["answer"]),
                             int(it.get("scene_seed", -1))]).encode())
    return h.hexdigest()[:16]


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
    """Accuracy per task, `mean` over the tasks present, `overall` over items, counts in `n`, plus the
    chance rate, Wilson 95% intervals and the distribution of picked letters per task."""
    per: dict[str, list[bool]] = {}
    chance: dict[str, list[float]] = {}
    picked: dict[str, list[int | None]] = {}
    widths: dict[str, list[int]] = {}
    for item, pick in zip(items, picks, strict=True):
        t = item["task"]
        per.setdefault(t, []).append(pick is not None and int(pick) == int(item["answer"]))
        chance.setdefault(t, []).append(1.0 / len(item["choices"]))
        picked.setdefault(t, []).append(None if pick is None else int(pick))
        widths.setdefault(t, []).append(len(item["choices"]))
    out: dict[str, Any] = {t: float(np.mean(per[t])) for t in tasks if per.get(t)}
    present = [t for t in tasks if t in out]
    out["mean"] = float(np.mean([out[t] for t in present])) if present else float("nan")
    flat = [x for t in present for x in per[t]]
    out["overall"] = float(np.mean(flat)) if flat else float("nan")
    out["n"] = {t: len(per.get(t, [])) for t in tasks}
    out["chance"] = {t: float(np.mean(chance[t])) for t in present}
    out["chance"]["mean"] = float(np.mean([out["chance"][t] for t in present])) if present else float("nan")
    out["chance"]["overall"] = float(np.mean([c for t in present for c in chance[t]])) if present else float("nan")
    out["ci"] = {t: list(stats.wilson(int(np.sum(per[t])), len(per[t]))) for t in present}
    out["ci"]["overall"] = list(stats.wilson(int(np.sum(flat)), len(flat))) if flat else [float("nan")] * 2
    if present:  # the tasks have equal item counts, so the mean is the pooled rate: its Wilson interval
        out["ci"]["mean"] = list(stats.wilson(int(round(out["mean"] * len(flat))), len(flat)))
    out["letters"] = {t: stats.letter_distribution(picked[t], widths[t]) for t in present}
    return out


def circular_scores(items: Sequence[Mapping[str, Any]], rotated_picks: Sequence[Sequence[int | None]],
                    tasks: Sequence[str] = CVBENCH_TASKS) -> tuple[dict[str, Any], list[bool]]:
    """CircularEval from the picks of every rotation of every item (`rotations` order): an item is right
    only when every rotation is. Returns (scores like `score_predictions`, with `chance` = mean
    (1/C)^C, the uniform guesser's rate; per-item correctness)."""
    correct = []
    for item, picks in zip(items, rotated_picks, strict=True):
        rots = rotations(item)
        correct.append(all(p is not None and int(p) == r["answer"] for p, r in zip(picks, rots, strict=True)))
    per: dict[str, list[bool]] = {}
    chance: dict[str, list[float]] = {}
    for item, ok in zip(items, correct, strict=True):
        per.setdefault(item["task"], []).append(ok)
        c = len(item["choices"])
        chance.setdefault(item["task"], []).append((1.0 / c) ** c)
    present = [t for t in tasks if per.get(t)]
    out: dict[str, Any] = {t: float(np.mean(per[t])) for t in present}
    out["mean"] = float(np.mean([out[t] for t in present])) if present else float("nan")
    out["overall"] = float(np.mean(correct)) if correct else float("nan")
    out["chance"] = {t: float(np.mean(chance[t])) for t in present}
    out["chance"]["mean"] = float(np.mean([out["chance"][t] for t in present])) if present else float("nan")
    out["ci"] = {t: list(stats.wilson(int(np.sum(per[t])), len(per[t]))) for t in present}
    return out, correct


def visual_verdicts(items: Sequence[Mapping[str, Any]], picks: Sequence[int | None],
                    blind_picks: Sequence[int | None], tasks: Sequence[str] = CVBENCH_TASKS) -> dict[str, Any]:
    """Per task: exact McNemar of sighted vs blind answers on the same items, and a plain sentence."""
    out: dict[str, Any] = {}
    for t in tasks:
        idx = [k for k, it in enumerate(items) if it["task"] == t]
        if not idx:
            continue
        seen = [picks[k] is not None and int(picks[k]) == int(items[k]["answer"]) for k in idx]
        grey = [blind_picks[k] is not None and int(blind_picks[k]) == int(items[k]["answer"]) for k in idx]
        test = stats.mcnemar(seen, grey)
        if test["verdict"] == stats.SIGNIFICANT and test["delta"] > 0:
            test["says"] = "uses the image (sighted > blind, significant at 95%)"
        elif test["verdict"] == stats.SIGNIFICANT:
            test["says"] = "blind > sighted (significant at 95%): the image hurts"
        else:
            test["says"] = "blind ≈ sighted: learned nothing visual"
        out[t] = test
    return out


def evaluate(run, world: sw.WorldConfig, split: str, *, per_task: int, method: str = "likelihood",
             seed: int = 0, batch_size: int = 16, circular: bool = True, blind_control: bool = True
             ) -> dict[str, Any]:
    """CV-Bench analogue on one split. With method="both" the likelihood scores are the headline and
    the generation scores sit under `generate`. `circular` adds CircularEval (every rotation of every
    item is asked; rotation 0 gives the plain scores), `blind_control` the flat-grey control."""
    if method not in ("likelihood", "generate", "both"):
        raise ValueError(f"config field 'eval.umm.mcq_method' = {method!r} is not allowed; "
                         "allowed: ['likelihood', 'generate', 'both']")
    items = mcq_items(world, split, per_task, seed)

    def answer(method_name, asked):
        if method_name == "likelihood":
            return answer_by_likelihood(run, asked, batch_size), None
        texts = answer_by_generation(run, asked, batch_size)
        return [mcq.parse_answer(a, it["choices"]) for a, it in zip(texts, asked, strict=True)], texts

    def scored(method_name):
        if circular:
            asked = [r for it in items for r in rotations(it)]
        else:
            asked = list(items)
        picks_all, texts = answer(method_name, asked)
        if circular:
            grouped, k = [], 0
            for it in items:
                c = len(it["choices"])
                grouped.append(picks_all[k:k + c])
                k += c
            picks = [g[0] for g in grouped]
        else:
            picks = picks_all
        res = score_predictions(items, picks)
        res["method"] = method_name
        per_item: dict[str, Any] = {"task": [it["task"] for it in items], "answer": [int(it["answer"]) for it in items],
                                    "pick": picks}
        if circular:
            res["circular"], per_item["circular"] = circular_scores(items, grouped)
        if blind_control:
            blind_picks, _ = answer(method_name, [blind(it) for it in items])
            res["blind"] = score_predictions(items, blind_picks)
            res["visual"] = visual_verdicts(items, picks, blind_picks)
            per_item["blind_pick"] = blind_picks
        res["per_item"] = per_item
        res["items_digest"] = items_digest(items)
        if texts is not None:
            res["unparsed"] = float(np.mean([p is None for p in picks])) if picks else float("nan")
            starts = np.cumsum([0] + [len(it["choices"]) for it in items])[:-1] if circular else range(len(items))
            res["examples"] = [{"question": text.format_mcq(i)[0], "answer": texts[int(k)]}
                               for i, k in zip(items[:3], list(starts)[:3], strict=True)]
        return res

    res = scored("likelihood" if method in ("likelihood", "both") else "generate")
    if method == "both":
        res["generate"] = scored("generate")
    return res


def constant_baselines(items: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Scores of blind constant strategies on a set of items (pure Python): always letter X, always
    the smallest / largest number offered (count), always the object named first (depth, distance).
    On the balanced set each equals the chance rate; a strategy above chance is a blind prior."""
    def rule(name, pick):
        return {name: score_predictions(items, [pick(it) for it in items])}

    out: dict[str, dict[str, float]] = {}
    width = max(len(it["choices"]) for it in items)
    for k in range(width):
        out.update(rule(f"always {_LETTERS[k]}", lambda it, k=k: k if k < len(it["choices"]) else None))

    def numeric(it, fn):
        try:
            vals = [int(c) for c in it["choices"]]
        except ValueError:
            return 0
        return vals.index(fn(vals))

    out.update(rule("always the smallest number", lambda it: numeric(it, min)))
    out.update(rule("always the largest number", lambda it: numeric(it, max)))

    def first_named(it):
        q = it["question"]
        pos = [q.find(f"the {c}") for c in it["choices"]]
        pos = [p if p >= 0 else len(q) for p in pos]
        if it["task"] == "distance":  # the anchor is named first; the candidates follow it
            anchor_end = q.find(",")
            pos = [q.find(f"the {c}", anchor_end) for c in it["choices"]]
        return int(np.argmin(pos))

    out.update(rule("always the object named first", first_named))
    return {k: {t: v[t] for t in (*CVBENCH_TASKS, "mean") if t in v} | {"chance_mean": v["chance"]["mean"]}
            for k, v in out.items()}
