"""configs/ablation_shapes.py: the sweep is every proxy x 3 seeds of valid post_shapes configs."""
import os
import sys

import pytest

from sgt_jax.checks import prepare
from sgt_jax.config import PROXIES, config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    return config_module(os.path.join(ROOT, "configs", "ablation_shapes.py"))


def test_sweep_covers_every_proxy_and_seed():
    mod = _module()
    points = mod.sweep("runs/base", steps=5, smoke=True)
    assert len(points) == 7 * 3
    assert {(p["proxy"], p["seed"]) for p in points} == {(x, s) for x in PROXIES + ("none",) for s in range(3)}
    for p in points:
        c = prepare(p["config"])
        assert c.seed == p["seed"] and c.data.shuffle_seed == p["seed"]
        assert c.train.steps == 5 and c.init_from.path == "runs/base"
        want = {"understanding"} if p["proxy"] == "none" else {"understanding", f"proxy_{p['proxy']}"}
        assert set(c.data.mixture.keys()) == want
    # one point by hand, as tools/train.py would load it
    c = mod.get_config("proxy=depth,seed=2,smoke,mixing=batches")
    assert c.seed == 2 and "proxy_depth" in c.data.mixture and c.data.mixing == "batches"
    with pytest.raises(ValueError, match="mixing"):
        mod.get_config("proxy=depth,mixing=sometimes")


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation_tool", os.path.join(ROOT, "tools", "ablation.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ablation_tool"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_driver_plan_flags_and_errors(capsys):
    tool = _tool()
    plan = tool.make_plan("/w", "full", rows=tool.ROWS, seeds=3, ratios=(0, 1, 2, 3), equal_vqa=True, mixing="batches")
    names = [s.name for s in plan.stages]
    assert names[:4] == ["data", "vq", "base", "base_eval"]
    assert len(names) == len(set(names))  # ratio 0:1 / 2:1 and equal steps reuse the seed-0 runs
    assert {f"{r}_s{s}" for r in tool.ROWS[1:] for s in range(3)} <= set(names)
    assert {"segmentation_ratio1_s0", "segmentation_ratio3_s0", "segmentation_equal_vqa_s0"} <= set(names)
    assert all("mixing=batches" in " ".join(s.argv) for s in plan.stages
               if s.name.startswith("edge_s") and not s.name.endswith("_eval"))
    with pytest.raises(SystemExit) as e:
        tool.parse_args(["--rows=base,bogus"])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tool.parse_args(["--ratios=a,b"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        tool.parse_args(["--eval", "mcq_itemz=3"])
    assert e.value.code == 2 and "mcq_itemz" in capsys.readouterr().err
    # equal VQA examples: 3x the steps of one post-training run (a stage built with steps=-3 once
    # failed after 50 stages had run: the unfinalized config's train.steps is -1)
    steps = tool._post_steps("quick")
    eq = next(s for s in tool.make_plan("/w", "quick", rows=("none",), seeds=1, ratios=(), equal_vqa=True,
                                        mixing="rows").stages if s.name == "segmentation_equal_vqa_s0")
    assert steps > 0 and f"steps={3 * steps}" in eq.argv[2]
    plan = tool.make_plan("/w", "quick", rows=("none",), seeds=1, ratios=(), equal_vqa=False, mixing="rows",
                          eval_overrides=("mcq_items=300",))
    assert plan.stages[-1].argv[-1] == "--config.eval.umm.mcq_items=300"
    # quick builds its 32 px dataset (the base's tokenizer lives there), then copies the shipped base
    # into the work dir (nothing is written into the repo)
    data = plan.stages[0]
    assert data.name == "data" and "--image_size=32" in data.argv and "--data_dir=/w/data" in data.argv
    copy = plan.stages[1]
    assert copy.name == "base" and copy.argv[1] == "tools/export_params.py" and "--out=/w/base" in copy.argv
    assert any(a.endswith("results/base_search/base_quick") for a in copy.argv)
    assert "vq" not in [s.name for s in plan.stages]
    assert all("quick" in " ".join(s.argv) and "base=/w/base" in " ".join(s.argv) for s in plan.stages
               if s.name == "none_s0")


def _simulated_runner(calls, monkeypatch, fail_at: str = ""):
    """A stage runner that fakes training and writes metrics the real scorers computed from simulated
    answers (skill per row); it fails (exit 1) on the stage whose workdir ends with `fail_at`."""
    import numpy as np

    from sgt_jax.data import shapes_world as sw
    from sgt_jax.eval import cvbench, geneval, umm_results

    skill = {"base": 0.3, "none": 0.5, "segmentation": 0.95}

    def runner(argv):
        calls.append(argv)
        workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
        if fail_at and workdir.endswith(fail_at):
            return 1
        if argv[1] != "tools/evaluate.py":
            os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
            return 0
        name = os.path.basename(workdir)
        row = name.split("_s")[0]
        seed = int(name.rsplit("_s", 1)[1]) if "_s" in name else 0
        rng = np.random.default_rng([seed, len(row)])

        def answer(run, asked, batch_size=16):
            return [int(it["answer"]) if rng.random() < skill[row] else int(rng.integers(len(it["choices"])))
                    for it in asked]

        monkeypatch.setattr(cvbench, "answer_by_likelihood", answer)
        cv = cvbench.evaluate(None, sw.WorldConfig(), "test", per_task=24, seed=0)
        results = [{"tag": t, "correct": bool(rng.random() < skill[row])} for t in geneval.TAGS for _ in range(10)]
        ge = geneval.score(results, intervals=True)
        ge["per_image"] = {"tag": [r["tag"] for r in results], "correct": [r["correct"] for r in results]}
        seg = {"miou": skill[row] / 2, "per_image_miou": list(rng.random(12) * skill[row]), "vq_ceiling_miou": 0.9}
        umm_results.write_metrics(workdir, {"step": 1, "splits": {"test": {"cvbench": cv, "geneval": ge,
                                                                         "segmentation": seg}}})
        return 0

    return runner


def test_driver_end_to_end_with_simulated_runs(tmp_path, monkeypatch):
    """The driver's stages, resume markers and report on simulated evaluations (the real micro run is
    `tools/ablation.py --profile=micro ...`)."""
    import json

    tool = _tool()
    calls = []
    runner = _simulated_runner(calls, monkeypatch)

    out, work = tmp_path / "results", tmp_path / "work"
    argv = [f"--out={out}", f"--work={work}", "--profile=micro", "--rows=base,none,segmentation", "--seeds=3",
            "--ratios=", "--no-equal_vqa"]
    assert tool.main(argv, runner=runner) == 0
    md = (out / "report.md").read_text()
    assert "| +SFT+SGT (instance segmentation) | 3 |" in md and "| base | 1 |" in md
    sgt = [line for line in md.splitlines() if line.startswith("| +SFT+SGT (instance segmentation) | CV-Bench (all")]
    assert sgt and "significant at 95%" in sgt[0]
    assert "not distinguishable" in md or "significant at 95%" in md
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"][0] == "tools/ablation.py" and manifest["commit"] and manifest["machine"]["cpus"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == {"base", "+SFT only", "+SFT+SGT (instance segmentation)"}
    # the single base run pairs with SFT-only seed 0 only: its items are not counted once per seed
    base_cv = next(r for r in summary["vs_reference"] if r["row"] == "base" and r["measure"] == "CV-Bench (all items)")
    sgt_cv = next(r for r in summary["vs_reference"] if r["row"].startswith("+SFT+SGT")
                  and r["measure"] == "CV-Bench (all items)")
    assert (base_cv["seeds"], sgt_cv["seeds"]) == (1, 3) and sgt_cv["items"] == 3 * base_cv["items"] == 3 * 4 * 24
    assert len(list((out / "runs").glob("*.json"))) == 7 and (out / "ablation_rows.png").exists()
    # resumable: a second run trains and evaluates nothing, and its manifest keeps the first run's
    # stage times (read back from the markers)
    n = len(calls)
    first_times = manifest["stage_seconds"]
    assert tool.main(argv, runner=runner) == 0 and len(calls) == n
    assert json.loads((out / "manifest.json").read_text())["stage_seconds"] == first_times


def test_driver_carries_a_partial_run_to_a_fresh_checkout(tmp_path, monkeypatch):
    """A run that stops part-way writes a partial report with --report_only; with only OUT kept (WORK
    is not committed), the same command restores the finished runs and trains only what is left."""
    import json
    import shutil

    tool = _tool()
    out, work = tmp_path / "results", tmp_path / "work"
    argv = [f"--out={out}", f"--work={work}", "--profile=micro", "--rows=base,none,segmentation", "--seeds=2",
            "--ratios=", "--no-equal_vqa"]
    calls = []
    with pytest.raises(SystemExit, match="segmentation_s1"):
        tool.main(argv, runner=_simulated_runner(calls, monkeypatch, fail_at="segmentation_s1"))
    assert tool.main(argv + ["--report_only"], runner=_simulated_runner(calls, monkeypatch)) == 0
    md = (out / "report.md").read_text()
    assert "**Partial: 2 of 11 stages not run yet** (segmentation_s1, segmentation_s1_eval)" in md
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages_left"] == ["segmentation_s1", "segmentation_s1_eval"]
    assert all(str(work) not in a for argv_ in manifest["stage_argv"].values() for a in argv_)
    done = manifest["stage_seconds"]

    shutil.rmtree(work)  # a fresh checkout: OUT was committed, WORK was not
    calls.clear()
    assert tool.main(argv, runner=_simulated_runner(calls, monkeypatch)) == 0
    ran = [next(a.split("=", 1)[1] for a in c if a.startswith("--workdir=")).rsplit("/", 1)[1] for c in calls]
    assert ran == ["vq", "base", "segmentation_s1", "segmentation_s1"]  # VQ and base always again; one run left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages_left"] == [] and "Partial" not in (out / "report.md").read_text()
    assert manifest["stages_commit"] and "stages ran at commit" in (out / "report.md").read_text()
    assert {k: v for k, v in manifest["stage_seconds"].items() if k in done and k not in ("vq", "base")} == \
        {k: v for k, v in done.items() if k not in ("vq", "base")}
    # a changed stage command is not restored: every post-training run trains again (base_eval's
    # command is unchanged, so it is restored)
    shutil.rmtree(work)
    calls.clear()
    assert tool.main(argv + ["--mixing=rows"], runner=_simulated_runner(calls, monkeypatch)) == 0
    evaluated = [next(a for a in c if a.startswith("--workdir=")) for c in calls if c[1] == "tools/evaluate.py"]
    assert len(calls) == 10 and len(evaluated) == 4 and not any(w.endswith("/base") for w in evaluated)
