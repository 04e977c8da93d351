"""The UMM evaluation suite end to end on a tiny untrained run, the workdir round trip, the report."""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.checks import prepare
from sgt_jax.config import default_config
from sgt_jax.data import render, text
from sgt_jax.data import shapes_world as sw
from sgt_jax.eval import cvbench, report, umm_eval, umm_results
from sgt_jax.eval.geneval import TAGS
from sgt_jax.eval.umm_run import UMMRun


def tiny_config(tokenizer_dir: str = ""):
    c = default_config()
    c.stage = "umm"
    c.data.image_size = 32
    c.data.answer_room = 45  # rows of 3 + 16 ViT + 45 = 64 positions (derived by finalize)
    c.data.tokenizer_dir = tokenizer_dir
    c.model.vq.codebook_size, c.model.vq.width, c.model.vq.depth, c.model.vq.num_heads = 64, 32, 1, 2
    u = c.model.umm
    u.llm.vocab_size = 512
    u.llm.width, u.llm.depth, u.llm.num_heads, u.llm.num_kv_heads, u.llm.head_dim, u.llm.mlp_dim = 32, 2, 2, 1, 16, 64
    u.vit.image_size, u.vit.patch_size, u.vit.width, u.vit.depth, u.vit.num_heads, u.vit.mlp_dim = 32, 8, 32, 1, 2, 64
    u.gen_embed_dim, u.gen_adapter_dim, u.gen_head_dim, u.und_adapter_dim = 8, 32, 32, 32
    e = c.eval.umm
    e.batch_size, e.mcq_items, e.geneval_prompts_per_tag, e.seg_images = 8, 3, 1, 3
    e.geneval_images_per_prompt = 1
    e.probe_train_scenes, e.probe_test_scenes, e.probe_steps, e.attn_items = 24, 12, 10, 6
    return prepare(c)


def random_params(stage, seed: int = 0):
    """Untrained weights without compiling the initialisers: shapes from `eval_shape`, N(0, 0.05)
    everywhere except norm scales (1). Cheap on a loaded 2-core machine; enough for range checks."""
    from flax import linen as nn

    from sgt_jax.train.optim import path_str

    shapes = nn.unbox(jax.eval_shape(lambda k: stage.init(k, stage.dummy_batch(1))[0], jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def make(path, s):
        if path_str(path).endswith("scale"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, 0.05, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sgt_jax.data import tokenizer as tok_lib
    from sgt_jax.train.stages import umm_stage

    root = tmp_path_factory.mktemp("eval_umm")
    cfg = tiny_config(str(root / "tok"))
    tok = tok_lib.build_shapes_tokenizer(str(root / "tok"), cfg, vocab_size=400, num_scenes=12)
    stage = umm_stage.UMMStage(cfg)
    params = random_params(stage)
    run = UMMRun.from_params(cfg, params["umm"], params["vq"], tok, workdir=str(root / "run"))
    return cfg, params, run, root


def _in_unit(x):
    return x is not None and math.isfinite(x) and 0.0 <= x <= 1.0


@pytest.fixture(scope="module")
def suite_metrics(tiny):
    """The full suite on the tiny run, once per module (its metrics file is written)."""
    _, _, run, _ = tiny
    m = umm_eval.evaluate(run)
    umm_results.write_metrics(run.workdir, m)
    return m


class _MaskOracleRun(UMMRun):
    """The tiny run, except that 'sampling' a proxy mask returns the true instance rendering of the
    scene whose image is in the prompt (or all black with `blank`): scores through the real suite."""

    blank = False

    def proxy_prefixes(self, images, instructions):
        self._images = [np.asarray(im) for im in images]
        return super().proxy_prefixes(images, instructions)

    def sample_images(self, cond, uncond, sampling, rng):
        world, out = self.world, []
        for image in self._images:
            scene = next(sw.generate_scene(i, world, split) for split in ("test", "heldout") for i in range(3)
                         if np.array_equal(sw.generate_scene(i, world, split)["image"], image))
            truth = render.instance_to_rgb(scene["instance"])
            out.append(np.zeros_like(truth) if self.blank else truth)
        return np.stack(out)


def test_segmentation_part_scores_true_masks_one_and_blank_masks_zero(tiny):
    import copy
    import dataclasses

    cfg, params, run, _ = tiny
    cfg = copy.deepcopy(cfg)
    cfg.eval.umm.parts, cfg.eval.umm.splits = ("segmentation",), ("test",)
    oracle = _MaskOracleRun(**{f.name: getattr(run, f.name) for f in dataclasses.fields(run)})
    oracle.cfg, oracle.workdir = cfg, None
    seg = umm_eval.evaluate(oracle)["splits"]["test"]["segmentation"]
    assert seg["miou"] == 1.0 and seg["pixel_accuracy"] == 1.0 and seg["num_instances"] >= 3
    oracle.blank = True
    seg = umm_eval.evaluate(oracle)["splits"]["test"]["segmentation"]
    assert seg["miou"] == 0.0 and seg["background_iou"] < 1.0


def test_full_suite_keys_and_ranges(tiny, suite_metrics):
    cfg, _, run, _ = tiny
    m = suite_metrics
    for split in ("test", "heldout"):
        res = m["splits"][split]
        cv = res["cvbench"]
        assert cv["method"] == "likelihood"
        for t in cvbench.CVBENCH_TASKS + ("mean",):
            assert _in_unit(cv[t]), (split, t, cv)
        assert all(n == 3 for n in cv["n"].values())
        # the controls next to every accuracy
        assert all(cv["ci"][t][0] <= cv[t] <= cv["ci"][t][1] for t in cvbench.CVBENCH_TASKS)
        assert cv["chance"]["relation"] == 0.25 and cv["chance"]["depth_order"] == 0.5
        assert set(cv["blind"]) >= set(cvbench.CVBENCH_TASKS) and set(cv["visual"]) == set(cvbench.CVBENCH_TASKS)
        assert all(cv["circular"][t] <= cv[t] for t in cvbench.CVBENCH_TASKS)
        assert len(cv["per_item"]["pick"]) == 12 and abs(sum(cv["letters"]["relation"].values()) - 1) < 1e-9
        ge = res["geneval"]
        for t in TAGS + ("overall",):
            assert _in_unit(ge[t]), (split, t)
        assert ge["overall"] == pytest.approx(np.mean([ge[t] for t in TAGS]))
        assert ge["num_images"] == 6 and ge["sampling"]["guidance_scale"] == 5.0
        assert all(ge["strict"][t] <= ge[t] for t in TAGS + ("overall",)) and ge["mean_detections"] >= 0
        seg = res["segmentation"]
        for k in ("miou", "miou_hungarian", "background_iou", "pixel_accuracy"):
            assert _in_unit(seg[k]), k
        assert seg["num_images"] == 3 and seg["miou_hungarian"] >= seg["miou"] - 1e-9
        assert _in_unit(seg["vq_ceiling_miou"]) and len(seg["per_image_miou"]) == 3
        assert len(ge["per_image"]["correct"]) == 6 and set(ge["ci"]) >= set(TAGS)
    p = m["probes"]
    assert p["layers"] == ["vit_0", "vit_1", "llm_0", "llm_1", "llm_2"]
    for t in ("shape", "color", "count"):
        assert len(p[t]["test_acc"]) == 5 and all(_in_unit(a) for a in p[t]["test_acc"] + p[t]["train_acc"])
    u = m["attention"]["understanding"]
    assert len(u["image"]) == cfg.model.umm.llm.depth
    np.testing.assert_allclose(np.add(np.add(u["image"], u["question"]), u["special"]), 1.0, atol=1e-4)
    assert all(0 < v < 1 for v in u["image"])
    g = m["attention"]["generation"]
    kinds = ("object", "color", "position", "count", "other")
    np.testing.assert_allclose(np.sum([g[k] for k in kinds], axis=0), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.sum([g[k] for k in ("prompt_total", "bos", "boi", "image")], axis=0), 1.0,
                               atol=1e-4)
    assert all(g[k][0] > 0 for k in ("object", "other"))  # every prompt has object words and filler
    # the metrics file is plain JSON, and the table prints every split
    path = umm_results.write_metrics(run.workdir, m)
    assert json.load(open(path))["splits"]["test"]["cvbench"]["mean"] == pytest.approx(m["splits"]["test"]["cvbench"]["mean"])
    table = umm_results.format_table(m)
    assert "heldout" in table and "seg_mIoU" in table
    for part in ("geneval", "segmentation"):
        assert os.path.exists(os.path.join(run.workdir, "eval", m["splits"]["test"][part]["samples"]))


def test_likelihood_scoring_picks_the_most_likely_choice(tiny):
    _, _, run, _ = tiny
    items = cvbench.mcq_items(run.world, "test", 2, seed=0)
    scores = cvbench.choice_logprobs(run, items, batch_size=8)
    assert [len(s) for s in scores] == [len(i["choices"]) for i in items]
    assert all(np.all(s < 0) for s in scores)
    # the cached scores equal a plain forward over the training row of each (item, choice)
    forward = jax.jit(lambda p, x: run.model.apply({"params": p}, x)["text_logits"][0])
    for item, got in zip(items[:2], scores[:2], strict=True):
        prompt, _ = text.format_mcq(item)
        for j, letter in enumerate("ABCD"[:len(item["choices"])]):
            ex = run.builder.understanding(item["image"], prompt, letter)
            inputs = {"tokens": ex["tokens"][None], "attn_mask": ex["attn_mask"][None],
                      "vit_images": ex["vit_image"][None], "vit_start": ex["vit_start"][None]}
            logits = forward(run.params, inputs)
            lp = jax.nn.log_softmax(logits[:-1], -1)[np.arange(len(ex["tokens"]) - 1), ex["tokens"][1:]]
            want = float(np.sum(np.where(ex["text_loss_weight"][:-1] > 0, lp, 0.0)))
            assert got[j] == pytest.approx(want, abs=1e-3)
    picks = cvbench.answer_by_likelihood(run, items, batch_size=8)
    res = cvbench.score_predictions(items, picks)
    truth = cvbench.score_predictions(items, [i["answer"] for i in items])
    assert truth["mean"] == 1.0 and _in_unit(res["mean"])
    # greedy generation + parsing as the second reading, recorded next to the likelihood scores
    both = cvbench.evaluate(run, run.world, "test", per_task=1, method="both", batch_size=8)
    assert both["method"] == "likelihood" and both["generate"]["method"] == "generate"
    assert _in_unit(both["generate"]["mean"]) and _in_unit(both["generate"]["unparsed"])
    assert all(isinstance(e["answer"], str) for e in both["generate"]["examples"])


def test_workdir_round_trip_and_report(tiny, tmp_path):
    from sgt_jax.train.checkpoint import Checkpointer
    from sgt_jax.train.state import TrainState

    cfg, params, _, _ = tiny
    workdir = str(tmp_path / "run")
    state = TrainState(step=jnp.int32(7), params=params, model_state={}, opt_state=jnp.zeros(()), ema_params=None,
                       consecutive_skips=jnp.int32(0), total_skips=jnp.int32(0))
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ck.save(7, state, metadata={"config": cfg.to_json_best_effort(), "stage": "umm"}, force=True)
    ck.close()
    from sgt_jax.train import restore

    assert restore.saved_stage(workdir) == "umm"
    # the command line: no --config needed for a UMM run, eval.umm fields by --config.eval.umm.*
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tool = [sys.executable, os.path.join(root, "tools", "evaluate.py"), f"--workdir={workdir}"]
    proc = subprocess.run(tool + ["--config.eval.umm.parts=('cvbench',)", "--config.eval.umm.splits=('test',)",
                                  "--config.eval.umm.mcq_items=2"], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cv_mean" in proc.stdout and '"test/cvbench/mean"' in proc.stdout
    m = umm_results.read_metrics(workdir)
    assert m["step"] == 7 and set(m["splits"]["test"]) == {"cvbench"} and m["settings"]["mcq_items"] == 2

    # user errors exit 2 naming the problem: a model field without --config, a bad part, an empty workdir
    for args, message in ((["--config.model.umm.llm.depth=3"], "only --config.eval.* fields"),
                          (["--config.eval.umm.parts=('cvbench','gen')"], "'eval.umm.parts'")):
        proc = subprocess.run(tool + args, cwd=root, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(tool[:2] + [f"--workdir={empty}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "there is no run there" in proc.stderr, proc.stderr[-2000:]

    # a three-row report from runs with only some parts: table with blanks, no crash
    runs = {"base": workdir, "+SFT": workdir, "+SFT+SGT": workdir}
    out = str(tmp_path / "demo" / "report.md")
    md = report.write_report(runs, out)
    assert os.path.exists(out) and "| +SFT+SGT |" in md and "CV-Bench" in md and "GenEval" in md


def test_report_with_plots(tiny, suite_metrics, tmp_path):
    _, _, run, _ = tiny
    full = umm_results.read_metrics(run.workdir)
    dirs = {}
    for i, name in enumerate(("base", "+SFT", "+SFT+SGT")):
        d = tmp_path / f"r{i}"
        m = json.loads(json.dumps(full))
        m["splits"]["test"]["cvbench"]["mean"] = 0.1 * (i + 1)
        umm_results.write_metrics(str(d), m)
        for part in ("geneval", "segmentation"):
            png = m["splits"]["test"][part]["samples"]
            shutil.copy(os.path.join(run.workdir, "eval", png), d / "eval" / png)
        with open(d / "metrics.jsonl", "w") as f:  # as the train loop logs it
            for step in (10, 20, 30):
                f.write(json.dumps({"step": step, "train/loss": 5.0 - step / 10 - i,
                                    "train/loss/understanding": 2.0 - step / 30}) + "\n")
        dirs[name] = str(d)
    out = tmp_path / "report.md"
    md = report.write_report(dirs, str(out))
    assert "| base |" in md and "| +SFT+SGT |" in md
    rows = [line for line in md.splitlines() if line.startswith("| +SFT |")]
    assert "20.0" in rows[0]
    delta = [line for line in md.splitlines() if line.startswith("| Δ +SFT+SGT − +SFT |")]
    assert len(delta) == 2 and "+10.0" in delta[0]  # test and held-out tables
    assert [r["train/loss"] for r in report.read_train_history(dirs["+SFT"])] == [3.0, 2.0, 1.0]
    for png in ("report_probes.png", "report_attention.png", "report_losses.png"):
        assert (tmp_path / png).stat().st_size > 1000
        assert f"({png})" in md
    assert "| +SFT | ![+SFT geneval](r1/eval/geneval_test.png) | ![+SFT segmentation](r1/eval/segmentation_test.png) |" in md
    abl = report.write_ablation_report({"segmentation": list(dirs.values()), "none": [dirs["base"]]},
                                       str(tmp_path / "ablation.md"))
    assert "| segmentation | 3 | " in abl and "20.0 [0.0, 44.8]" in abl  # mean and t interval over 3 seeds
    # the report carries intervals, the blind control, CircularEval and paired verdicts on the same items
    assert "accuracy [95% CI]" in md and "blind (grey image)" in md and "circular (chance)" in md
    paired = [line for line in md.splitlines() if line.startswith("| +SFT+SGT vs +SFT |")]
    assert paired and all(("not distinguishable" in line) or ("significant at 95%" in line) for line in paired)
    assert "Sample sizes: 3 items per CV-Bench task" in md


def test_demo_report_points_to_the_full_result(tmp_path, load_tool):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo = load_tool("demo")
    lines = "\n".join(demo.ablation_pointer())
    assert "results/shapes_ablation/" in lines
    summary = os.path.join(root, "results", "shapes_ablation", "summary.json")
    full = os.path.exists(summary) and json.load(open(summary)).get("profile") == "full"
    assert ("NOT been run yet" in lines) != full


def test_demo_quick_plan_starts_from_the_shipped_base(load_tool):
    """make demo's quick profile copies the shipped base and post-trains from it at 32 px; the
    quick_scratch profile trains that base's VQ and base itself with the same recipe."""
    demo = load_tool("demo")
    quick = {s.name: s.argv for s in demo.plan("/w", "quick")}
    assert list(quick)[:2] == ["data", "base"] and "vq" not in quick
    assert "--image_size=32" in quick["data"]
    assert quick["base"][1] == "tools/export_params.py" and f"--workdir={demo.SHIPPED_BASE}" in quick["base"]
    for name in ("sft", "sgt"):
        config = next(a for a in quick[name] if a.startswith("--config="))
        assert "quick" in config and "base=/w/base" in config
    scratch = {s.name: s.argv for s in demo.plan("/w", "quick_scratch")}
    assert "--config=configs/vq_shapes.py:f8,size=32" in scratch["vq"]
    assert any(a.startswith("--config=configs/base_shapes.py:") and a.endswith(",quick") for a in scratch["base"])
