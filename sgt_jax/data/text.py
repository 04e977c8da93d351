"""All text of Shapes World: captions, CV-Bench-style questions, GenEval-style prompts, SGT
instructions, and a corpus iterator for training the tokenizer.

Why here, in one module: every string the model sees about a scene is derived from the scene's
object list by rules that the scorers (`sgt_jax.eval.mcq`, `sgt_jax.eval.geneval`) can check exactly.

Referring expressions: (colour, shape) pairs are unique within a scene, so "the red star" names one
object. Geometry used by the questions:
* 2D relation: GenEval's position rule on visible boxes (`geneval.relative_position`); only pairs where
  exactly one relation holds are asked, with the four options left / right / above / below every time,
  so the answer is visible and the option set does not give the axis away.
* count: "how many <shape>s" offers 0, 1, 2; "how many objects" offers four consecutive numbers.
  Options ascending. The evaluation set (`balanced_mcq_items`) fills exact quotas so the truth is
  uniform over the offered numbers and every constant answer scores the chance rate.
* depth order ("closer to the camera"): smaller depth; only pairs whose depths differ by >= 0.1.
* relative distance ("closer to X"): Euclidean distance between (centre_x / S, centre_y / S, depth);
  asked only when the farther candidate is >= 1.3x as far as the nearer one.
"""
from __future__ import annotations

import dataclasses
import itertools
import zlib
from typing import Any, Iterator, Mapping

import numpy as np

from sgt_jax.data import shapes_world as sw
from sgt_jax.data.geneval_rules import RELATIONS, TAGS, evaluate_detections, relative_position, scene_detections

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen")
MCQ_TASKS: tuple[str, ...] = ("count", "relation", "depth_order", "distance", "attribute")
_REL_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_PROMPT_SALT = 0x4745


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _name(o: Mapping[str, Any]) -> str:
    return f"{o['color']} {o['shape']}"


def _world_cfg(cfg) -> sw.WorldConfig:
    if cfg is None:
        return sw.WorldConfig()
    if isinstance(cfg, sw.WorldConfig):
        return cfg
    return sw.WorldConfig.from_config(cfg)


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


# ---------------------------------------------------------------------------------------------
# SGT instructions
# ---------------------------------------------------------------------------------------------
def _segmentation_instructions() -> list[str]:
    heads = [
        "Segment the instances", "Segment every object in the image", "Segment each object",
        "Separate the objects in this picture", "Mask every object", "Mark each instance",
        "Paint every object", "Fill in each shape", "Highlight every instance in the scene",
        "Split the scene into its individual objects", "Draw an instance mask for this image",
        "Produce an instance segmentation of the picture", "Give me the instance segmentation",
        "Render the instance mask", "Outline and fill each object", "Cover every object with a flat colour",
        "Turn this image into an instance map", "Show where each object is",
        "Create a mask for every object you can see", "Label each object region",
    ]
    tails = [
        ", a different colour for each.", ", using one colour per instance.",
        " with a distinct colour for every instance.", ", giving each one its own colour.",
        " so that no two instances share a colour.", "; each instance gets a unique colour.",
        ", one flat color per object.",
    ]
    out = [h + t for h, t in itertools.product(heads, tails)]
    out += [
        "Instance segmentation, please: one colour per object.",
        "Colour each object differently and black out the background.",
        "Which pixels belong to which object? Paint each object its own colour.",
        "Give every object in the picture its own solid colour and leave the background dark.",
        "Show me the objects as coloured masks, one colour apiece.",
        "Replace each object by a solid patch of a colour no other object uses.",
        "Draw the segmentation map where every instance has its own colour.",
        "Predict the instance masks and colour them distinctly.",
        "Separate all instances and paint them in different colours.",
        "Make a picture in which each object is a different flat colour.",
        "Can you segment the instances, assigning a separate colour to each?",
        "Please colour-code every object instance in this image.",
        "Generate the instance mask: distinct colours, background in black.",
        "Paint the background black and each object in a colour of its own.",
        "Segment all the shapes, one colour for every shape.",
    ]
    return out


INSTRUCTIONS: dict[str, list[str]] = {
    "segmentation": _segmentation_instructions(),
    "semantic": [
        "Segment the image by class, one colour per kind of shape.",
        "Colour each object according to its shape class.",
        "Produce a semantic segmentation: objects of the same shape share a colour.",
        "Paint every shape with the colour of its category.",
        "Give me the semantic map of this picture.",
        "Label every pixel with its shape class.",
        "Draw the class mask, using one colour for each type of shape.",
        "Show the semantic segmentation with a fixed colour per category.",
    ],
    "depth": [
        "Estimate the depth of the scene.",
        "Draw the depth map: nearer objects brighter.",
        "Show how far each object is from the camera, in shades of grey.",
        "Render a depth image of this picture.",
        "Predict the depth map, with the background dark.",
        "Paint each object grey by its distance, closer means lighter.",
        "Give me the depth map of the scene.",
    ],
    "edge": [
        "Draw the edges of the objects.",
        "Trace the object boundaries in white on black.",
        "Show only the outlines of the objects.",
        "Produce an edge map of this image.",
        "Detect the contours of every object.",
        "Sketch the boundaries between the objects and the background.",
        "Extract the object outlines.",
    ],
    "reconstruction": [
        "Reconstruct the image.",
        "Redraw this picture exactly.",
        "Copy the input image.",
        "Reproduce the image as faithfully as you can.",
        "Generate the same picture again.",
        "Repaint this image pixel for pixel.",
        "Recreate the scene you see.",
    ],
    "mae": [
        "Fill in the missing patches.",
        "Complete the masked regions of the image.",
        "Inpaint the grey squares.",
        "Restore the hidden parts of the picture.",
        "Reconstruct the full image from the visible patches.",
        "Repair the image where it has been masked out.",
        "Paint in what is behind the grey patches.",
    ],
}


# ---------------------------------------------------------------------------------------------
# captions and text-to-image prompts
# ---------------------------------------------------------------------------------------------
def _describe(o: Mapping[str, Any], rng: np.random.Generator, detail: float = 0.5) -> str:
    words = []
    if rng.random() < detail:
        words.append(o["size"])
    if o["texture"] != "flat" and rng.random() < detail:
        words.append("striped" if o["texture"] == "stripes" else "speckled")
    words += [o["color"], o["shape"]]
    return _a(" ".join(words))


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _clear_pairs(objs: list[dict]) -> list[tuple[int, int, str]]:
    out = []
    for i, j in itertools.permutations(range(len(objs)), 2):
        for rel in sorted(relative_position(objs[i]["bbox"], objs[j]["bbox"])):
            out.append((i, j, rel))
    return out


def caption(scene: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A true multi-sentence description: the objects, then some layout and depth facts."""
    objs = sw.scene_objects(scene)
    n = len(objs)
    order = rng.permutation(n)
    listed = _join([_describe(objs[i], rng, 0.7) for i in order])
    opener = _pick(rng, [
        "There {be} {n} {obj}: {list}.", "The image shows {list}.", "A picture of {list}.",
        "In this scene there {be} {list}.", "{N} {obj} on a plain background: {list}."])
    count_word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    text = opener.format(be="is" if n == 1 else "are", n=count_word, N=count_word.capitalize(),
                         obj="object" if n == 1 else "objects", list=listed)
    text = text[0].upper() + text[1:]
    facts = []
    pairs = _clear_pairs(objs)
    for k in rng.permutation(len(pairs))[:2]:
        i, j, rel = pairs[k]
        facts.append(f"The {_name(objs[i])} is {_REL_WORDS[rel]} the {_name(objs[j])}.")
    if n >= 2:
        i, j = rng.choice(n, 2, replace=False)
        if abs(objs[i]["depth"] - objs[j]["depth"]) >= 0.1:
            near, far = (i, j) if objs[i]["depth"] < objs[j]["depth"] else (j, i)
            facts.append(_pick(rng, [
                f"The {_name(objs[near])} is closer to the camera than the {_name(objs[far])}.",
                f"The {_name(objs[far])} is farther away than the {_name(objs[near])}."]))
        occluded = [o for o in objs if o["area"] < o.get("full_area", o["area"])]
        if occluded and rng.random() < 0.5:
            facts.append(f"The {_name(occluded[0])} is partly hidden.")
    return " ".join([text] + facts)


def t2i_prompt(scene: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A generation prompt that is true of the scene: every object is named (so the image is pinned
    down up to layout details), sometimes with one relation that holds under the GenEval rule."""
    objs = sw.scene_objects(scene)
    order = list(rng.permutation(len(objs)))
    parts = [_describe(objs[i], rng, 0.3) for i in order]
    lead = _pick(rng, ["a photo of ", "an image of ", "a picture of ", ""])
    text = lead + _join(parts)
    pairs = _clear_pairs(objs)
    if pairs and rng.random() < 0.5:
        i, j, rel = pairs[int(rng.integers(len(pairs)))]
        text += f", with the {_name(objs[i])} {_REL_WORDS[rel]} the {_name(objs[j])}"
    return text


# ---------------------------------------------------------------------------------------------
# CV-Bench-style multiple choice
# ---------------------------------------------------------------------------------------------
def _position3d(o: Mapping[str, Any], s: int) -> np.ndarray:
    cx, cy = o.get("center", o["centroid"])
    return np.array([cx / s, cy / s, o["depth"]])


def _mcq(task: str, question: str, choices: list[str], answer: str, rng: np.random.Generator) -> dict:
    choices = [choices[i] for i in rng.permutation(len(choices))]
    return {"task": task, "question": question, "choices": choices, "answer": choices.index(answer)}


RELATION_CHOICES: tuple[str, ...] = ("left", "right", "above", "below")
SHAPE_COUNT_MAX = 2  # "how many <shape>s" is offered 0..2: with <= 4 objects of 8 shapes, 3 of one shape is rare
COUNT_OPTIONS = 4  # "how many objects" offers 4 consecutive numbers
_REL_WORD = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


def _count_question(kind: str, shape: str | None) -> str:
    return "How many objects are in the image?" if kind == "objects" else \
        f"How many {sw.PLURALS[shape]} are in the image?"


def _relation_question(a: str, b: str) -> str:
    return (f"Considering the relative positions of the {a} and the {b} in the image, "
            f"where is the {a} located with respect to the {b}?")


def _depth_question(first: str, second: str) -> str:
    return f"Which of these two objects, the {first} or the {second}, is closer to the camera?"


def _distance_question(anchor: str, first: str, second: str) -> str:
    return (f"Estimate the real-world distances between objects in this image. Which object is "
            f"closer to the {anchor}, the {first} or the {second}?")


def mcq_candidates(scene: Mapping[str, Any], world: sw.WorldConfig | None = None) -> dict[str, list[dict]]:
    """Every askable CV-Bench-style fact of a scene, per task (the raw material of both the training
    questions and the balanced evaluation set):
    * count: {kind: "shape" | "objects", shape, truth}; shape counts only up to SHAPE_COUNT_MAX;
    * relation: {a, b, truth} for ordered pairs where exactly one GenEval relation holds (so the four
      options left / right / above / below have exactly one right answer);
    * depth_order: {near, far} with depths >= 0.1 apart;
    * distance: {anchor, near, far}, the farther one >= 1.3x as far from the anchor.
    Shape counts are asked about the shapes of `world` (default: the full world), so a smaller world
    never asks about a shape that cannot occur (a blind "0")."""
    world = _world_cfg(world)
    objs = sw.scene_objects(scene)
    s = int(np.asarray(scene["image"]).shape[0]) if "image" in scene else 64
    n = len(objs)
    out: dict[str, list[dict]] = {"count": [{"kind": "objects", "shape": None, "truth": n}]}
    for shape in world.shapes:
        k = sum(o["shape"] == shape for o in objs)
        if k <= SHAPE_COUNT_MAX:
            out["count"].append({"kind": "shape", "shape": shape, "truth": k})
    out["relation"] = []
    for i, j in itertools.permutations(range(n), 2):
        rels = relative_position(objs[i]["bbox"], objs[j]["bbox"])
        if len(rels) == 1:
            out["relation"].append({"a": _name(objs[i]), "b": _name(objs[j]), "truth": _REL_WORD[next(iter(rels))]})
    out["depth_order"] = []
    for i, j in itertools.combinations(range(n), 2):
        if abs(objs[i]["depth"] - objs[j]["depth"]) >= 0.1:
            near, far = (i, j) if objs[i]["depth"] < objs[j]["depth"] else (j, i)
            out["depth_order"].append({"near": _name(objs[near]), "far": _name(objs[far])})
    out["distance"] = []
    for a in range(n):
        pa = _position3d(objs[a], s)
        for b, c in itertools.combinations([k for k in range(n) if k != a], 2):
            db = np.linalg.norm(_position3d(objs[b], s) - pa)
            dc = np.linalg.norm(_position3d(objs[c], s) - pa)
            if max(db, dc) >= 1.3 * min(db, dc):
                near, far = (b, c) if db < dc else (c, b)
                out["distance"].append({"anchor": _name(objs[a]), "near": _name(objs[near]), "far": _name(objs[far])})
    return out


def count_window(kind: str, truth: int, lo: int) -> list[str]:
    """The offered numbers of a count item, ascending: 0..SHAPE_COUNT_MAX for shape counts, COUNT_OPTIONS
    consecutive numbers from `lo` for object counts."""
    if kind == "shape":
        return [str(v) for v in range(SHAPE_COUNT_MAX + 1)]
    return [str(v) for v in range(lo, lo + COUNT_OPTIONS)]


def build_mcq(task: str, cand: Mapping[str, Any], *, letter: int = 0, truth_first: bool = True,
              lo: int = 0) -> dict:
    """One item {task, question, choices, answer} from a candidate of `mcq_candidates`.

    count: options ascending (`count_window`), so the letter is fixed by the truth; relation: the four
    fixed options, so the letter is fixed by the relation; depth_order / distance: the right object sits
    at `letter` and is named first in the question when `truth_first`."""
    if task == "count":
        choices = count_window(cand["kind"], cand["truth"], lo)
        return {"task": task, "question": _count_question(cand["kind"], cand["shape"]), "choices": choices,
                "answer": choices.index(str(cand["truth"]))}
    if task == "relation":
        return {"task": task, "question": _relation_question(cand["a"], cand["b"]),
                "choices": list(RELATION_CHOICES), "answer": RELATION_CHOICES.index(cand["truth"])}
    if task not in ("depth_order", "distance"):
        raise ValueError(f"unknown CV-Bench task {task!r}; allowed: count, relation, depth_order, distance")
    named = (cand["near"], cand["far"]) if truth_first else (cand["far"], cand["near"])
    choices = [cand["far"], cand["far"]]
    choices[letter] = cand["near"]
    choices[1 - letter] = cand["far"]
    q = _depth_question(*named) if task == "depth_order" else _distance_question(cand["anchor"], *named)
    return {"task": task, "question": q, "choices": choices, "answer": letter}


def mcq_questions(scene: Mapping[str, Any], rng: np.random.Generator, world: sw.WorldConfig | None = None) -> list[dict]:
    """At most one question per task in MCQ_TASKS (those the scene supports), each
    {task, question, choices, answer (index into choices)}: the training questions, in exactly the
    layouts of the balanced evaluation set (`balanced_mcq_items`). The count truth is drawn uniformly
    over the values the scene offers (not over shapes, which would make "0" the usual answer)."""
    world = _world_cfg(world)
    objs = sw.scene_objects(scene)
    cands = mcq_candidates(scene, world)
    out = []
    count = cands["count"]
    if rng.random() < 0.5:
        c = count[0]
        lo = int(rng.integers(max(1, c["truth"] - COUNT_OPTIONS + 1), c["truth"] + 1))
    else:
        shape_c = count[1:]
        values = sorted({c["truth"] for c in shape_c})
        v = values[int(rng.integers(len(values)))]
        c = _pick(rng, [c for c in shape_c if c["truth"] == v])
        lo = 0
    out.append(build_mcq("count", c, lo=lo))
    for task in ("relation", "depth_order", "distance"):
        if cands[task]:
            out.append(build_mcq(task, _pick(rng, cands[task]), letter=int(rng.integers(2)),
                                 truth_first=bool(rng.integers(2))))
    # attribute: colour of a uniquely-shaped object, or shape of a uniquely-coloured one
    by_shape = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
    by_color = [o for o in objs if sum(p["color"] == o["color"] for p in objs) == 1]
    if by_shape and (not by_color or rng.random() < 0.5):
        o = _pick(rng, by_shape)
        wrong = [c for c in world.colors if c != o["color"]]
        opts = [o["color"]] + [wrong[i] for i in rng.permutation(len(wrong))[:3]]
        out.append(_mcq("attribute", f"What colour is the {o['shape']}?", opts, o["color"], rng))
    elif by_color:
        o = _pick(rng, by_color)
        wrong = [c for c in world.shapes if c != o["shape"]]
        opts = [o["shape"]] + [wrong[i] for i in rng.permutation(len(wrong))[:3]]
        out.append(_mcq("attribute", f"What shape is the {o['color']} object?", opts, o["shape"], rng))
    return out


def _split_evenly(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def mcq_cells(task: str, per_task: int, cfg=None) -> dict[tuple, int]:
    """Quota per cell of the balanced evaluation set. A cell fixes what a blind model could exploit:
    count (kind, window start, truth): half shape counts, half object counts, truth uniform over the
    offered numbers; relation (truth): uniform over the four options; depth_order / distance (answer
    letter, right object named first): uniform over the four combinations.

    Exact balance needs a world whose object counts span >= COUNT_OPTIONS values (the default 1..4)
    and max_objects >= SHAPE_COUNT_MAX; in smaller worlds the truth cannot take every offered number,
    and `tools/mcq_baselines.py` shows the resulting blind prior."""
    wcfg = _world_cfg(cfg)
    if task == "count":
        shape_n, objects_n = _split_evenly(int(per_task), 2)
        cells = {}
        shape_values = range(min(SHAPE_COUNT_MAX, wcfg.max_objects) + 1)
        for v, q in zip(shape_values, _split_evenly(shape_n, len(shape_values)), strict=True):
            cells[("shape", 0, v)] = q
        los = list(range(wcfg.min_objects, max(wcfg.min_objects, wcfg.max_objects - COUNT_OPTIONS + 1) + 1))
        for lo, q_lo in zip(los, _split_evenly(objects_n, len(los)), strict=True):
            values = [v for v in range(lo, lo + COUNT_OPTIONS) if wcfg.min_objects <= v <= wcfg.max_objects]
            # a window wider than the world's range keeps its offered numbers but can only be true on
            # the values a scene can have; the report's chance rate is 1 / options either way
            for v, q in zip(values, _split_evenly(q_lo, len(values)), strict=True):
                cells[("objects", lo, v)] = q
        return cells
    if task == "relation":
        return dict(zip([(r,) for r in RELATION_CHOICES], _split_evenly(int(per_task), 4), strict=True))
    if task in ("depth_order", "distance"):
        keys = [(letter, first) for letter in (0, 1) for first in (True, False)]
        return dict(zip(keys, _split_evenly(int(per_task), 4), strict=True))
    raise ValueError(f"unknown CV-Bench task {task!r}; allowed: count, relation, depth_order, distance")


def _cell_of(task: str, cand: Mapping[str, Any]) -> tuple | None:
    """The cell a candidate can fill, ignoring layout (which the filler chooses)."""
    if task == "count":
        return (cand["kind"], cand["truth"])
    if task == "relation":
        return (cand["truth"],)
    return ()


def balanced_mcq_items(cfg=None, split: str = "test", per_task: int = 500, seed: int = 0,
                       tasks=("count", "relation", "depth_order", "distance"),
                       max_scenes: int | None = None) -> list[dict]:
    """A fixed CV-Bench-analogue set with exact quotas (`mcq_cells`): balanced answer letters and
    answer values, so every constant answer scores the chance rate. Scenes 0, 1, ... of `split` are
    visited in order and each contributes at most one item per task, to the still-open cell with the
    largest remaining quota it can fill. Items: {task, question, choices, answer, scene_seed, cell}.
    Deterministic in (cfg, split, per_task, seed); raises when `max_scenes` cannot fill the quotas."""
    wcfg = _world_cfg(cfg)
    if split not in sw.SPLITS:
        raise ValueError(f"split {split!r} is not allowed; allowed: {list(sw.SPLITS)}")
    quotas = {t: {k: v for k, v in mcq_cells(t, per_task, wcfg).items() if v > 0} for t in tasks}
    limit = int(max_scenes) if max_scenes is not None else 40 * max(1, int(per_task)) + 200
    rng = np.random.default_rng([_PROMPT_SALT, 12, sw.SPLITS.index(split), int(seed)])
    out: list[dict] = []
    for i in range(limit):
        if not any(quotas.values()):
            break
        cands = mcq_candidates(sw.generate_scene(i, wcfg, split), wcfg)
        for task in tasks:
            open_cells = quotas[task]
            if not open_cells:
                continue
            options = []  # (remaining quota, tie-break, cell, candidate)
            for cand in cands[task]:
                key = _cell_of(task, cand)
                for cell, left in open_cells.items():
                    fits = (cell[0], cell[2]) == key if task == "count" else (cell == key if key else True)
                    if fits:
                        options.append((left, cell, cand))
            if not options:
                continue
            best = max(o[0] for o in options)
            top = [o for o in options if o[0] == best]
            _, cell, cand = top[int(rng.integers(len(top)))]
            if task == "count":
                item = build_mcq(task, cand, lo=cell[1])
            elif task == "relation":
                item = build_mcq(task, cand)
            else:
                item = build_mcq(task, cand, letter=cell[0], truth_first=cell[1])
            out.append({**item, "scene_seed": i, "cell": list(cell)})
            open_cells[cell] -= 1
            if not open_cells[cell]:
                del open_cells[cell]
    missing = {t: dict(q) for t, q in quotas.items() if q}
    if missing:
        raise ValueError(f"balanced_mcq_items: {limit} scenes of split {split!r} could not fill the quotas "
                         f"{missing} (per_task={per_task}); pass a larger max_scenes or a smaller per_task")
    order = {t: k for k, t in enumerate(tasks)}
    return sorted(out, key=lambda it: (order[it["task"]], it["scene_seed"]))


def mcq_eval_items(cfg=None, n_scenes: int = 100, split: str = "test", seed: int = 0) -> list[dict]:
    """A fixed CV-Bench-analogue set: the questions of scenes 0..n_scenes-1 of a split, each item
    carrying `seed` and `split` so the evaluator can regenerate its image."""
    wcfg = _world_cfg(cfg)
    rng = np.random.default_rng([_PROMPT_SALT, 11, seed])
    return [dict(q, seed=i, split=split) for i in range(n_scenes)
            for q in mcq_questions(sw.generate_scene(i, wcfg, split), rng, wcfg)]


def format_mcq(question: Mapping[str, Any]) -> tuple[str, str]:
    """(prompt, answer letter), the same layout as `sgt_jax.data.sequences.format_mcq`."""
    letters = "ABCDEFGH"
    opts = " ".join(f"({letters[i]}) {c}" for i, c in enumerate(question["choices"]))
    return f"{question['question']} {opts} Answer:", letters[int(question["answer"])]


# ---------------------------------------------------------------------------------------------
# GenEval-style prompts
# ---------------------------------------------------------------------------------------------
def _pairs_for(cfg: sw.WorldConfig, split: str) -> list[tuple[str, str]]:
    return sw.allowed_pairs(cfg, split)


def geneval_prompt(tag: str, rng: np.random.Generator, cfg=None, split: str = "test") -> dict:
    """A prompt of one GenEval tag: dict(prompt, tag, include, exclude, split). Colour x shape pairs
    follow the split's rules (held-out pairs only for split="heldout", where every colour-bearing
    prompt uses one)."""
    cfg = _world_cfg(cfg)
    pairs = _pairs_for(cfg, split)
    held = [p for p in sw.HELDOUT_PAIRS if p[0] in cfg.colors and p[1] in cfg.shapes]
    shapes = list(cfg.shapes)

    def two_shapes():
        i, j = rng.choice(len(shapes), 2, replace=False)
        return shapes[i], shapes[j]

    if tag == "single_object":
        a = _pick(rng, shapes)
        prompt, inc, exc = f"a photo of {_a(a)}", [{"class": a, "count": 1}], []
    elif tag == "two_object":
        a, b = two_shapes()
        prompt, inc, exc = f"a photo of {_a(a)} and {_a(b)}", [{"class": a, "count": 1}, {"class": b, "count": 1}], []
    elif tag == "counting":
        a = _pick(rng, shapes)
        k = int(rng.integers(2, 5))
        prompt = f"a photo of {NUMBER_WORDS[k]} {sw.PLURALS[a]}"
        inc, exc = [{"class": a, "count": k}], [{"class": a, "count": k + 1}]
    elif tag == "colors":
        c, a = _pick(rng, held if split == "heldout" else pairs)
        prompt, inc, exc = f"a photo of {_a(c + ' ' + a)}", [{"class": a, "count": 1, "color": c}], []
    elif tag == "position":
        a, b = two_shapes()
        rel = _pick(rng, RELATIONS)
        prompt = f"a photo of {_a(a)} {rel} {_a(b)}"
        inc = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
        exc = []
    elif tag == "color_attr":
        while True:
            (c1, a), (c2, b) = _pick(rng, held if split == "heldout" else pairs), _pick(rng, pairs)
            if a != b and c1 != c2:
                break
        if rng.random() < 0.5:
            (c1, a), (c2, b) = (c2, b), (c1, a)
        prompt = f"a photo of {_a(c1 + ' ' + a)} and {_a(c2 + ' ' + b)}"
        inc, exc = [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}], []
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}; allowed: {list(TAGS)}")
    return {"prompt": prompt, "tag": tag, "include": inc, "exclude": exc, "split": split}


def geneval_prompts(n_per_tag: int, seed: int = 0, cfg=None, split: str = "test") -> list[dict]:
    """A fixed evaluation set: n prompts per tag, deterministic from the seed."""
    rng = np.random.default_rng([_PROMPT_SALT, seed])
    return [geneval_prompt(t, rng, cfg, split) for t in TAGS for _ in range(n_per_tag)]


def scene_for_prompt(spec: Mapping[str, Any], seed: int, cfg=None) -> dict:
    """A scene that satisfies the prompt's clauses exactly (checked with the GenEval logic on its
    ground-truth boxes): only the prompted objects, none overlapping, unspecified colours drawn from
    the split's allowed pairs with (colour, shape) unique. Deterministic from (spec, seed)."""
    cfg = _world_cfg(cfg)
    split = spec.get("split", "test")
    split = split if split in sw.SPLITS else "test"
    rng = np.random.default_rng([_PROMPT_SALT, sw.SPLITS.index(split), int(seed),
                                 zlib.crc32(spec["prompt"].encode())])
    pairs = _pairs_for(cfg, split)
    n_total = sum(int(r["count"]) for r in spec["include"])
    if n_total > sw.INSTANCE_PALETTE_SIZE - 1:
        raise ValueError(f"prompt needs {n_total} objects; at most {sw.INSTANCE_PALETTE_SIZE - 1}")
    wcfg = dataclasses.replace(cfg, min_objects=1, max_objects=max(n_total, 1), min_visible_fraction=1.0)
    for _ in range(cfg.max_tries):
        chosen: list[tuple[str, str]] = []
        for req in spec["include"]:
            for _k in range(int(req["count"])):
                if req.get("color"):
                    p = (req["color"], req["class"])
                else:
                    cols = [c for c, s in pairs if s == req["class"] and (c, s) not in chosen]
                    p = (_pick(rng, cols), req["class"])
                chosen.append(p)
        if len(set(chosen)) != len(chosen):
            continue
        depths = sw._sample_depths(rng, len(chosen), cfg.min_depth_gap)
        order = rng.permutation(len(chosen))
        specs = [{"color": chosen[i][0], "shape": chosen[i][1],
                  "size": _pick(rng, cfg.sizes), "texture": _pick(rng, cfg.textures),
                  "depth": float(depths[r])} for r, i in enumerate(order)]

        def accept(scene):
            return evaluate_detections(scene_detections(scene), spec)[0]

        scene = sw.paint_scene(specs, rng, wcfg, separate_all=True, accept=accept)
        if scene is not None:
            scene.update(seed=int(seed), split=split, prompt=spec["prompt"])
            return scene
    raise RuntimeError(f"could not build a scene for prompt {spec['prompt']!r}")


# ---------------------------------------------------------------------------------------------
# tokenizer corpus
# ---------------------------------------------------------------------------------------------
def corpus(cfg=None, n: int = 1000, seed: int = 0) -> Iterator[str]:
    """Every kind of text the model will see: all instructions once, then for n train scenes their
    caption, t2i prompt and MCQ items (formatted with answers), plus GenEval prompts of every tag."""
    wcfg = _world_cfg(cfg)
    for items in INSTRUCTIONS.values():
        yield from items
    rng = np.random.default_rng([_PROMPT_SALT, 7, seed])
    for i in range(n):
        scene = sw.generate_scene(i, wcfg, "train")
        yield caption(scene, rng)
        yield t2i_prompt(scene, rng)
        for q in mcq_questions(scene, rng, wcfg):
            prompt, letter = format_mcq(q)
            yield f"{prompt} {letter}"
        yield geneval_prompt(TAGS[i % len(TAGS)], rng, wcfg, "train")["prompt"]
