"""Evaluation that can tell: intervals cover the truth, McNemar p-values, CircularEval, balanced items."""
from collections import Counter

import numpy as np
import pytest

from sgt_jax.data import shapes_world as sw
from sgt_jax.data import text
from sgt_jax.eval import cvbench, stats

WORLD = sw.WorldConfig()
TASKS = cvbench.CVBENCH_TASKS


def _coverage_tolerance(runs: int, level: float = 0.95) -> tuple[float, float]:
    sd = (level * (1 - level) / runs) ** 0.5
    return level - 3.5 * sd, min(1.0, level + 3.5 * sd)


@pytest.mark.parametrize("p,n", [(0.3, 100), (0.5, 64), (0.9, 200)])
def test_wilson_interval_covers_truth_at_nominal_rate(p, n):
    rng = np.random.default_rng(1)
    runs = 400
    hits = 0
    for _ in range(runs):
        k = int((rng.random(n) < p).sum())
        lo, hi = stats.wilson(k, n)
        hits += lo <= p <= hi
    lo_ok, hi_ok = _coverage_tolerance(runs)
    assert lo_ok <= hits / runs <= hi_ok, hits / runs


def test_bootstrap_interval_covers_truth():
    rng = np.random.default_rng(2)
    runs, hits = 200, 0
    for r in range(runs):
        x = rng.beta(2, 5, size=80)  # true mean 2/7
        b = stats.bootstrap_mean(x, n_boot=1000, seed=r)
        hits += b["lo"] <= 2 / 7 <= b["hi"]
    assert 0.88 <= hits / runs <= 0.99, hits / runs
    # grouped: resampling whole images, pooling their members
    g = stats.bootstrap_mean([[1.0, 0.0], [1.0], []], n_boot=200)
    assert g["mean"] == pytest.approx(2 / 3) and g["n"] == 2


def test_mcnemar_known_p_values():
    a = [True] * 6 + [False] * 4
    b = [False] * 6 + [False] * 4
    t = stats.mcnemar(a, b)  # 6 discordant, all one way: p = 2 / 2^6
    assert (t["a_only"], t["b_only"]) == (6, 0) and t["p"] == pytest.approx(2 / 64) and t["verdict"] == stats.SIGNIFICANT
    a = [True] * 9 + [False] * 1 + [True] * 20
    b = [False] * 9 + [True] * 1 + [True] * 20
    t = stats.mcnemar(a, b)  # 9 vs 1: p = 2 * (1 + 10) / 1024
    assert t["p"] == pytest.approx(22 / 1024) and t["delta"] == pytest.approx(8 / 30)
    t = stats.mcnemar([True, False, True], [True, False, True])
    assert t["p"] == 1.0 and t["verdict"] == stats.NOT_DISTINGUISHABLE
    t = stats.mcnemar([True] * 3 + [False] * 2, [False] * 3 + [True] * 2)  # 3 vs 2
    assert t["p"] == pytest.approx(1.0) and t["verdict"] == stats.NOT_DISTINGUISHABLE
    with pytest.raises(ValueError, match="same items"):
        stats.mcnemar([True], [True, False])
    pb = stats.paired_bootstrap(np.ones(50), np.zeros(50))
    assert pb["verdict"] == stats.SIGNIFICANT and pb["delta"] == 1.0
    pt = stats.paired_t([0.5, 0.6, 0.55], [0.5, 0.6, 0.55])
    assert pt["verdict"] == stats.NOT_DISTINGUISHABLE
    # a constant difference without seed variance (one run repeated against every seed) is undefined,
    # not significant
    pt = stats.paired_t([0.004] * 3, [0.0] * 3)
    assert np.isnan(pt["p"]) and pt["verdict"] == stats.NOT_DISTINGUISHABLE
    si = stats.seed_interval([0.4, 0.5, 0.6])
    assert si["mean"] == pytest.approx(0.5) and si["lo"] < 0.4 and si["hi"] > 0.6


def test_balanced_items_have_exact_letter_and_value_counts():
    items = text.balanced_mcq_items(WORLD, "test", 48, seed=0)
    assert items == text.balanced_mcq_items(WORLD, "test", 48, seed=0)
    by = {t: [i for i in items if i["task"] == t] for t in TASKS}
    assert all(len(v) == 48 for v in by.values())
    rel = by["relation"]
    assert {tuple(i["choices"]) for i in rel} == {text.RELATION_CHOICES}  # the option set hides the axis
    assert Counter(i["choices"][i["answer"]] for i in rel) == {r: 12 for r in text.RELATION_CHOICES}
    for t in ("depth_order", "distance"):
        assert Counter(i["answer"] for i in by[t]) == {0: 24, 1: 24}
        first = Counter(i["question"].find(f"the {i['choices'][i['answer']]}") <
                        i["question"].find(f"the {i['choices'][1 - i['answer']]}") for i in by[t])
        if t == "depth_order":
            assert first == {True: 24, False: 24}
    count = by["count"]
    shape = [i for i in count if i["choices"] == ["0", "1", "2"] and "objects" not in i["question"]]
    objects = [i for i in count if "objects" in i["question"]]
    assert len(shape) == len(objects) == 24
    assert Counter(i["answer"] for i in shape) == {0: 8, 1: 8, 2: 8}
    assert Counter(i["answer"] for i in objects) == {0: 6, 1: 6, 2: 6, 3: 6}  # truth uniform over 1..4
    # every scene used at most once per task
    for t in TASKS:
        assert len({i["scene_seed"] for i in by[t]}) == 48


def test_constant_answers_score_chance_on_balanced_items():
    items = text.balanced_mcq_items(WORLD, "test", 48, seed=0)
    base = cvbench.constant_baselines(items)
    chance = cvbench.score_predictions(items, [0] * len(items))["chance"]
    for letter in "AB":
        assert all(base[f"always {letter}"][t] == pytest.approx(chance[t]) for t in TASKS)
    for letter in "CD":  # offered by count (C: every item, D: object counts only) and relation
        assert base[f"always {letter}"]["relation"] == pytest.approx(0.25)
    assert base["always C"]["count"] == pytest.approx(chance["count"])
    assert base["always D"]["count"] < chance["count"]
    for rule in ("always the smallest number", "always the largest number"):
        assert base[rule]["count"] == pytest.approx(chance["count"])
    for t in ("depth_order", "distance"):
        assert base["always the object named first"][t] == pytest.approx(0.5)


class _FakeRun:
    """Stands in for a UMM: `answer_by_likelihood` is patched, so no model is needed."""


@pytest.mark.parametrize("policy", ["oracle", "constant", "visual"])
def test_cvbench_oracle_constant_and_blind_control(monkeypatch, policy):
    def answer(run, asked, batch_size=16):
        out = []
        for it in asked:
            grey = bool(np.all(np.asarray(it["image"]) == cvbench.GREY))
            if policy == "oracle" or (policy == "visual" and not grey):
                out.append(int(it["answer"]))
            else:
                out.append(0)
        return out

    monkeypatch.setattr(cvbench, "answer_by_likelihood", answer)
    res = cvbench.evaluate(_FakeRun(), WORLD, "test", per_task=24, seed=0)
    assert res["n"] == {t: 24 for t in TASKS}
    if policy in ("oracle", "visual"):
        assert all(res[t] == 1.0 for t in TASKS) and res["circular"]["mean"] == 1.0
    if policy == "oracle":
        assert all(res["blind"][t] == 1.0 for t in TASKS)
        assert all(v["says"].startswith("blind ≈ sighted") for v in res["visual"].values())
    if policy == "constant":  # letter A always: chance exactly, and 0 under CircularEval
        assert all(res[t] == pytest.approx(res["chance"][t]) for t in TASKS)
        assert res["circular"]["mean"] == 0.0
        assert all(res["letters"][t]["A"] == 1.0 for t in TASKS)
        assert all(v["says"].startswith("blind ≈ sighted") for v in res["visual"].values())
    if policy == "visual":
        assert res["visual"]["relation"]["says"].startswith("uses the image")
        assert res["blind"]["relation"] == pytest.approx(0.25)
    assert len(res["per_item"]["pick"]) == 96 and len(res["per_item"]["circular"]) == 96
    assert res["ci"]["count"][0] <= res["count"] <= res["ci"]["count"][1]


def test_mcq_baselines_tool(capsys, load_tool):
    tool = load_tool("mcq_baselines")
    assert tool.main(["--per_task=8", "--splits=test"]) == 0
    out = capsys.readouterr().out
    assert "always A" in out and "chance" in out and "32 items" in out
    with pytest.raises(SystemExit) as e:
        tool.main(["--splits=nope"])
    assert e.value.code == 2
