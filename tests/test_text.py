"""Shapes World text: instructions, captions, t2i prompts, MCQ answers and GenEval prompts are true."""
import re

import numpy as np
import pytest

from sgt_jax.config import PROXIES
from sgt_jax.data import shapes_world as sw
from sgt_jax.data import text
from sgt_jax.eval import geneval

CFG = sw.WorldConfig(image_size=64, max_objects=5)


def test_instructions():
    assert set(text.INSTRUCTIONS) == set(PROXIES)
    seg = text.INSTRUCTIONS["segmentation"]
    assert len(seg) >= 100 and len(set(seg)) == len(seg)
    for proxy, items in text.INSTRUCTIONS.items():
        assert len(items) >= 5 and len(set(items)) == len(items), proxy
        for s in items:
            assert s[0].isupper() and s[-1] in ".?" and "  " not in s and ",," not in s, s
    # no instruction of one proxy is reused for another
    all_items = [s for v in text.INSTRUCTIONS.values() for s in v]
    assert len(all_items) == len(set(all_items))


def _named(o):
    return f"{o['color']} {o['shape']}"


def test_captions_and_t2i_prompts_are_true():
    rel_re = re.compile(r"the (\w+ \w+) (?:is )?(to the left of|to the right of|above|below) the (\w+ \w+)")
    words = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
    for seed in range(60):
        sc = sw.generate_scene(seed, CFG)
        rng = np.random.default_rng(seed)
        objs = {_named(o): o for o in sc["objects"]}
        for s in (text.caption(sc, rng), text.t2i_prompt(sc, rng)):
            for name in objs:
                assert name in s, (name, s)
            mentioned = set(re.findall(r"(\w+) (" + "|".join(sw.SHAPES) + r")\b", s))
            for color, shape in mentioned:
                assert f"{color} {shape}" in objs, (color, shape, s)
            for a, rel, b in rel_re.findall(s.lower()):
                assert words[rel] in geneval.relative_position(objs[a]["bbox"], objs[b]["bbox"]), s
        cap = text.caption(sc, rng)
        for near, far in re.findall(r"the (\w+ \w+) is closer to the camera than the (\w+ \w+)", cap):
            assert objs[near]["depth"] < objs[far]["depth"]


def test_mcq_answers_match_ground_truth():
    seen = set()
    for seed in range(80):
        sc = sw.generate_scene(seed, CFG, "validation")
        objs = {_named(o): o for o in sc["objects"]}
        for q in text.mcq_questions(sc, np.random.default_rng(seed)):
            seen.add(q["task"])
            ans = q["choices"][q["answer"]]
            assert len(set(q["choices"])) == len(q["choices"]) >= 2
            if q["task"] == "count":
                m = re.match(r"How many (\w+) are", q["question"])
                if m.group(1) == "objects":
                    assert int(ans) == len(objs)
                else:
                    shape = {v: k for k, v in sw.PLURALS.items()}[m.group(1)]
                    assert int(ans) == sum(o["shape"] == shape for o in objs.values())
            elif q["task"] == "relation":
                a, b = re.search(r"where is the (\w+ \w+) located with respect to the (\w+ \w+)\?", q["question"]).groups()
                ca, cb = objs[a]["centroid"], objs[b]["centroid"]
                sign = {"left": ca[0] < cb[0], "right": ca[0] > cb[0], "above": ca[1] < cb[1], "below": ca[1] > cb[1]}
                assert sign[ans]
            elif q["task"] == "depth_order":
                other = [c for c in q["choices"] if c != ans][0]
                assert objs[ans]["depth"] < objs[other]["depth"]
            elif q["task"] == "distance":
                anchor = re.search(r"closer to the (\w+ \w+),", q["question"]).group(1)
                other = [c for c in q["choices"] if c != ans][0]
                p = lambda o: np.array([o["center"][0] / 64, o["center"][1] / 64, o["depth"]])  # noqa: E731
                assert np.linalg.norm(p(objs[ans]) - p(objs[anchor])) < np.linalg.norm(p(objs[other]) - p(objs[anchor]))
            elif q["task"] == "attribute":
                m = re.match(r"What colour is the (\w+)\?", q["question"])
                if m:
                    (o,) = [o for o in objs.values() if o["shape"] == m.group(1)]
                    assert ans == o["color"]
                else:
                    color = re.match(r"What shape is the (\w+) object\?", q["question"]).group(1)
                    (o,) = [o for o in objs.values() if o["color"] == color]
                    assert ans == o["shape"]
    assert seen == set(text.MCQ_TASKS)


@pytest.mark.parametrize("tag", geneval.TAGS)
def test_geneval_prompts_have_clauses_and_true_scenes(tag):
    rng = np.random.default_rng(0)
    for i in range(8):
        spec = text.geneval_prompt(tag, rng, CFG)
        assert spec["tag"] == tag and spec["prompt"].startswith("a photo of")
        for c in spec["include"] + spec["exclude"]:
            assert c["class"] in sw.SHAPES and c["count"] >= 1
            assert c["class"] in spec["prompt"] or sw.PLURALS[c["class"]] in spec["prompt"]
            if "color" in c:
                assert c["color"] in spec["prompt"]
        if tag == "counting":
            (inc,), (exc,) = spec["include"], spec["exclude"]
            assert exc["count"] == inc["count"] + 1 and 2 <= inc["count"] <= 4
        if tag == "position":
            assert spec["include"][1]["position"][0] in spec["prompt"]
        sc = text.scene_for_prompt(spec, i, CFG)
        assert geneval.evaluate_detections(geneval.scene_detections(sc), spec)[0]
        n = sum(c["count"] for c in spec["include"])
        assert len(sc["objects"]) == n
        again = text.scene_for_prompt(spec, i, CFG)
        np.testing.assert_array_equal(sc["image"], again["image"])


def test_geneval_prompt_splits_respect_heldout_pairs():
    held = set(sw.HELDOUT_PAIRS)
    rng = np.random.default_rng(1)
    for _ in range(100):
        for tag in ("colors", "color_attr"):
            spec = text.geneval_prompt(tag, rng, CFG, split="test")
            sc = text.scene_for_prompt(spec, 0, CFG) if tag == "colors" else None
            pairs = {(c["color"], c["class"]) for c in spec["include"]}
            assert not pairs & held
            if sc is not None:
                assert not {(o["color"], o["shape"]) for o in sc["objects"]} & held
            spec = text.geneval_prompt(tag, rng, CFG, split="heldout")
            assert {(c["color"], c["class"]) for c in spec["include"]} & held
    with pytest.raises(ValueError):
        text.geneval_prompt("bogus", rng, CFG)


def test_corpus_covers_all_text_kinds():
    items = list(text.corpus(sw.WorldConfig(image_size=32), n=12))
    joined = "\n".join(items)
    assert all(isinstance(s, str) and s for s in items)
    for inst in text.INSTRUCTIONS["segmentation"][:3] + text.INSTRUCTIONS["depth"][:1]:
        assert inst in items
    assert "Answer:" in joined and "a photo of" in joined and "closer to" in joined


def test_training_questions_use_the_evaluation_layouts():
    """Training MCQs are laid out like the balanced evaluation set: relation always offers the four
    directions, counts offer 0..2 (shape) or four consecutive numbers from >= 1 (objects), ascending."""
    kinds = set()
    for seed in range(60):
        sc = sw.generate_scene(seed, CFG, "train")
        for q in text.mcq_questions(sc, np.random.default_rng(seed)):
            if q["task"] == "relation":
                assert tuple(q["choices"]) == text.RELATION_CHOICES
            elif q["task"] == "count":
                nums = [int(c) for c in q["choices"]]
                assert nums == sorted(nums) and nums == list(range(nums[0], nums[0] + len(nums)))
                if "objects" in q["question"]:
                    kinds.add("objects")
                    assert nums[0] >= 1 and len(nums) == text.COUNT_OPTIONS
                else:
                    kinds.add("shape")
                    assert nums == [0, 1, 2]
            elif q["task"] in ("depth_order", "distance"):
                assert len(q["choices"]) == 2
    assert kinds == {"objects", "shape"}


def test_the_simple_world_draws_and_asks_only_its_own_contents():
    """data.world="simple": scenes hold only its shapes, colours and sizes, flat on a plain
    background; questions never ask about a shape it cannot contain (a blind "0"); the balanced
    set still fills its quotas; its dataset and tokenizer live in their own directories."""
    from sgt_jax import checks
    from sgt_jax import config as config_lib
    from sgt_jax.data import datasets, tfds_shapes_world
    from sgt_jax.eval import cvbench

    cfg = config_lib.default_config()
    cfg.data.image_size, cfg.data.world = 32, "simple"
    world = sw.WorldConfig.from_config(cfg)
    preset = sw.WORLD_PRESETS["simple"]
    assert world.shapes == preset["shapes"] and world.image_size == 32
    rng = np.random.default_rng(0)
    asked = set()
    for i in range(40):
        scene = sw.generate_scene(i, world, "train")
        assert scene["background_texture"] == "plain"
        for o in sw.scene_objects(scene):
            assert o["shape"] in preset["shapes"] and o["color"] in preset["colors"]
            assert o["size"] in preset["sizes"] and o["texture"] == "flat"
        for q in text.mcq_questions(scene, rng, world):
            if q["task"] == "attribute":
                assert set(q["choices"]) <= set(preset["shapes"]) | set(preset["colors"]), q
            m = re.match(r"How many (\w+) are", q["question"])
            if m:
                asked.add(m.group(1))
    plurals = {sw.PLURALS[s] for s in preset["shapes"]}
    assert asked and asked <= plurals | {"objects"}
    items = cvbench.mcq_items(world, "test", per_task=24)
    assert len(items) == 4 * 24
    base = cvbench.constant_baselines(items)
    chance = cvbench.score_predictions(items, [0] * len(items))["chance"]
    for rule in ("always A", "always B", "always the smallest number", "always the largest number"):
        for task in ("count", "relation"):
            assert base[rule][task] == pytest.approx(chance[task]), (rule, task)
    assert "_simple_" in tfds_shapes_world.config_from(cfg).name
    assert "_simple_" in datasets.tokenizer_dir_for(cfg, "/data")
    cfg.data.world = "tiny"
    with pytest.raises(config_lib.ConfigError, match=r"data\.world.*'tiny'.*full.*simple"):
        checks.prepare(cfg)
