"""Real-benchmark harnesses: CV-Bench from a local copy (official aggregation), GenEval export layout."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sgt_jax.eval import cvbench_real, geneval_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (source, type, task, n_choices, answer letters): per source the constant answer "A" scores the chance rate
ITEMS = [("ADE20K", "2D", "Count", 4, "ABCD"), ("COCO", "2D", "Relation", 2, "AB"), ("COCO", "2D", "Count", 4, "BCDA"),
         ("Omni3D", "3D", "Depth", 2, "AB"), ("Omni3D", "3D", "Distance", 2, "BA")]


def _rows():
    rows = []
    for source, typ, task, n, letters in ITEMS:
        for letter in letters:
            i = len(rows)
            rows.append({"idx": i, "type": typ, "task": task, "source": source, "question": f"Question {i}?",
                         "choices": [f"c{j}" for j in range(n)], "answer": f"({letter})",
                         "filename": f"img/{typ}/{task.lower()}/{source.lower()}_{i}.png"})
    return rows


def _png(seed, h=20, w=30):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=["jsonl_2d_3d", "parquet"])
def cvbench_root(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("cvbench")
    rows = _rows()
    if request.param == "jsonl_2d_3d":
        for r in rows:
            os.makedirs(root / os.path.dirname(r["filename"]), exist_ok=True)
            (root / r["filename"]).write_bytes(_png(r["idx"]))
        for typ in ("2D", "3D"):
            with open(root / f"test_{typ.lower()}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r["type"] == typ)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for r in rows:
            r["image"] = {"bytes": _png(r["idx"]), "path": r["filename"]}
        pq.write_table(pa.Table.from_pylist(rows), root / "test.parquet")
    return str(root)


def test_oracle_scores_one_and_constant_scores_chance(cvbench_root):
    items = cvbench_real.load_items(cvbench_root, 16)
    assert len(items) == sum(len(x[4]) for x in ITEMS) and items[0]["image"].shape == (16, 16, 3)
    oracle = cvbench_real.evaluate(None, cvbench_root, answer=lambda its: [it["answer"] for it in its], image_size=16)
    assert oracle["accuracy"] == 1.0 and oracle["accuracy_2d"] == 1.0 and oracle["accuracy_3d"] == 1.0
    const = cvbench_real.evaluate(None, cvbench_root, answer=lambda its: [0] * len(its), image_size=16)
    chance = {s: np.mean([1 / n for src, _, _, n, letters in ITEMS if src == s for _ in letters])
              for s in ("ADE20K", "COCO", "Omni3D")}
    assert const["per_source"] == pytest.approx(chance)
    # the official rule: 2D = mean(ADE20K, COCO), 3D = Omni3D, overall = mean(2D, 3D)
    assert const["accuracy_2d"] == pytest.approx((chance["ADE20K"] + chance["COCO"]) / 2)
    assert const["accuracy"] == pytest.approx(((chance["ADE20K"] + chance["COCO"]) / 2 + chance["Omni3D"]) / 2)
    assert const["per_task"]["Count"] == pytest.approx(0.25)
    assert const["n"] == {"ADE20K": 4, "COCO": 6, "Omni3D": 4}


def test_bad_answer_is_named(tmp_path):
    row = dict(_rows()[0], answer="(E)")
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl row 0 .*'\(E\)'"):
        cvbench_real.load_items(str(tmp_path), 16)
    with pytest.raises(FileNotFoundError, match="test_2d.jsonl"):
        cvbench_real.load_items(str(tmp_path / "nothing"), 16)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from test_eval_umm import random_params, tiny_config

    from sgt_jax.data import tokenizer as tok_lib
    from sgt_jax.eval.umm_run import UMMRun
    from sgt_jax.train.stages import umm_stage

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(str(root / "tok"))
    tok = tok_lib.build_shapes_tokenizer(str(root / "tok"), cfg, vocab_size=400, num_scenes=12)
    params = random_params(umm_stage.UMMStage(cfg))
    run = UMMRun.from_params(cfg, params["umm"], params["vq"], tok, workdir=str(root / "run"))
    run.all_params = params  # the checkpoint test saves them
    return run


def test_cvbench_on_a_tiny_model_both_methods(tiny_run, tmp_path):
    rows = _rows()[:6]
    for r in rows:
        os.makedirs(tmp_path / os.path.dirname(r["filename"]), exist_ok=True)
        (tmp_path / r["filename"]).write_bytes(_png(r["idx"]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = cvbench_real.evaluate(tiny_run, str(tmp_path), method="both", batch_size=4)
    assert res["method"] == "likelihood" and res["generate"]["method"] == "generate"
    for r in (res, res["generate"]):
        assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy_3d"] is None and r["sources_present"] == ["ADE20K", "COCO"]
    assert "CV-Bench" in cvbench_real.format_table(res)


def _official_reader(imagedir):
    """What GenEval's evaluation/evaluate_images.py reads: digit folders, json.load(metadata.jsonl),
    samples/<n>.png matching r"\\d+\\.png"."""
    found = []
    for sub in sorted(os.listdir(imagedir)):
        folder = os.path.join(imagedir, sub)
        if not os.path.isdir(folder) or not sub.isdigit():
            continue
        with open(os.path.join(folder, "metadata.jsonl")) as fp:
            meta = json.load(fp)
        for name in sorted(os.listdir(os.path.join(folder, "samples"))):
            path = os.path.join(folder, "samples", name)
            if os.path.isfile(path) and re.match(r"\d+\.png", name):
                found.append((sub, meta, np.asarray(Image.open(path))))
    return found


def test_geneval_export_layout_and_determinism(tiny_run, tmp_path):
    from sgt_jax.infer.sampler import SamplingConfig

    metas = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
             {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cup", "count": 1}],
              "prompt": "a photo of a dog and a cup"}]
    meta_file = tmp_path / "evaluation_metadata.jsonl"
    meta_file.write_text("".join(json.dumps(m) + "\n" for m in metas))
    sampling = SamplingConfig(guidance_scale=3.0, temperature=1.0, top_k=8, seed=7)
    out = tmp_path / "out"
    summary = geneval_export.export(tiny_run, geneval_export.read_metadata(str(meta_file)), str(out),
                                    sampling=sampling, n_samples=2)
    assert summary["prompts_written"] == 2
    found = _official_reader(str(out))
    assert [(s, m) for s, m, _ in found] == [("00000", metas[0])] * 2 + [("00001", metas[1])] * 2
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for _, _, im in found)
    assert sorted(os.listdir(out / "00000" / "samples")) == ["00000.png", "00001.png"]
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["guidance_scale"] == 3.0 and settings["top_k"] == 8 and settings["seed"] == 7
    assert settings["n_samples"] == 2
    # a prompt's samples depend only on (seed, index): prompt 1 alone reproduces its images
    alone = tmp_path / "alone"
    geneval_export.export(tiny_run, metas, str(alone), sampling=sampling, n_samples=2, indices=[1])
    assert (alone / "00001/samples/00000.png").read_bytes() == (out / "00001/samples/00000.png").read_bytes()
    again = geneval_export.export(tiny_run, metas, str(out), sampling=sampling, n_samples=2)
    assert again["prompts_already_done"] == 2 and again["prompts_written"] == 0


def test_geneval_export_tool_rejects_bad_flags(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "geneval_export.py"), f"--workdir={tmp_path}",
                           f"--metadata={tmp_path / 'missing.jsonl'}", f"--outdir={tmp_path / 'o'}", "--n_samples=0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing.jsonl" in proc.stderr and "--n_samples=0" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_evaluate_tool_rejects_a_cvbench_dir_without_the_release(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), f"--workdir={tmp_path}",
                           f"--cvbench_dir={tmp_path / 'cvb'}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "test.jsonl" in proc.stderr and "cvb" in proc.stderr


def test_both_tools_end_to_end_on_a_checkpoint(tiny_run, tmp_path):
    """tools/evaluate.py --cvbench_dir and tools/geneval_export.py on a saved tiny UMM run."""
    import jax.numpy as jnp

    from sgt_jax.train.checkpoint import Checkpointer
    from sgt_jax.train.state import TrainState

    workdir = str(tmp_path / "run")
    state = TrainState(step=jnp.int32(3), params=tiny_run.all_params, model_state={}, opt_state=jnp.zeros(()),
                       ema_params=None, consecutive_skips=jnp.int32(0), total_skips=jnp.int32(0))
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ck.save(3, state, metadata={"config": tiny_run.cfg.to_json_best_effort(), "stage": "umm"}, force=True)
    ck.close()
    rows = _rows()[:4] + _rows()[-2:]
    cvb = tmp_path / "cvb"
    for r in rows:
        os.makedirs(cvb / os.path.dirname(r["filename"]), exist_ok=True)
        (cvb / r["filename"]).write_bytes(_png(r["idx"]))
    (cvb / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), f"--workdir={workdir}",
                           f"--cvbench_dir={cvb}"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "eval" / "cvbench.json").read_text())
    assert res["step"] == 3 and res["n"] == {"ADE20K": 4, "COCO": 0, "Omni3D": 2} and 0 <= res["accuracy"] <= 1
    assert "CV-Bench (likelihood, n=6)" in proc.stdout
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [{"class": "cat", "count": 1}],
                                "prompt": "a photo of a cat"}) + "\n")
    out = tmp_path / "geneval"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "geneval_export.py"), f"--workdir={workdir}",
                           f"--metadata={meta}", f"--outdir={out}", "--n_samples=2", "--guidance_scale=2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_official_reader(str(out))) == 2
    assert json.loads((out / "sampling.json").read_text())["step"] == 3
