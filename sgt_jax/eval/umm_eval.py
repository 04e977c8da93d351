"""Evaluate a UMM run on Shapes World: the paper's benchmarks and analyses, exactly scored.

    python tools/evaluate.py --workdir=runs/sgt [--data_dir=DIR] [--config.eval.umm.mcq_items=100 ...]

writes `<workdir>/eval/metrics.json` and prints a table. Parts (`eval.umm.parts`):
  cvbench       CV-Bench analogue per split: count, relation, depth order, distance (+ mean)  [cvbench.py]
  geneval       GenEval analogue per split: six tags + overall, with the sampling settings [geneval_eval.py]
  segmentation  SGT inference image -> instruction -> mask codes -> instance map, mIoU  [geneval_eval.py]
  probes        linear probes per ViT / LLM layer for shape, colour, count             [probes.py]
  attention     attention shares per layer, understanding and generation               [attention.py]
Splits (`eval.umm.splits`): "test" and the held-out compositional split "heldout" for the first
three parts; probes fit on train scenes and score on test scenes; attention uses the test split.

Every budget is a field of the config's `eval.umm` section (schema and rules in sgt_jax/config.py),
small by default so `make demo` can evaluate three runs in a few minutes on 2 CPU cores. Scenes,
items and prompts are fixed by `eval.umm.seed`, so runs are compared on identical inputs. The run
(`umm_run.UMMRun`) and the results file and table (`umm_results`) live in their own modules.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from sgt_jax.data import shapes_world as sw
from sgt_jax.eval import attention, cvbench, geneval_eval, probes
from sgt_jax.eval.umm_results import format_table, write_metrics
from sgt_jax.eval.umm_run import UMMRun, seg_sampling, t2i_sampling

log = logging.getLogger(__name__)


def evaluate(run: UMMRun, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the parts of `run.cfg.eval.umm` on `run`; returns the metrics dict written to metrics.json."""
    s = run.cfg.eval.umm
    say = progress or (lambda msg: log.info("%s", msg))
    world = run.world
    out: dict[str, Any] = {"step": int(run.step), "workdir": run.workdir, "settings": s.to_dict(),
                           "splits": {}, "timing_s": {}}
    t_all = time.time()

    def timed(name, fn, *args, **kw):
        t = time.time()
        say(f"eval {name} ...")
        res = fn(*args, **kw)
        out["timing_s"][name] = round(time.time() - t, 2)
        say(f"eval {name}: {out['timing_s'][name]:.1f}s")
        return res

    for split in s.splits:
        res: dict[str, Any] = {}
        if "cvbench" in s.parts:
            res["cvbench"] = timed(f"cvbench/{split}", cvbench.evaluate, run, world, split, per_task=s.mcq_items,
                                   method=s.mcq_method, seed=s.seed, batch_size=s.batch_size,
                                   circular=bool(s.mcq_circular), blind_control=bool(s.mcq_blind))
        if "geneval" in s.parts:
            res["geneval"] = timed(f"geneval/{split}", geneval_eval.evaluate_geneval, run, world, split,
                                   prompts_per_tag=s.geneval_prompts_per_tag,
                                   images_per_prompt=s.geneval_images_per_prompt, sampling=t2i_sampling(s), seed=s.seed,
                                   batch_size=s.batch_size, sample_dir=_sample_dir(run))
        if "segmentation" in s.parts:
            res["segmentation"] = timed(f"segmentation/{split}", geneval_eval.evaluate_segmentation, run, world, split,
                                        num_images=s.seg_images, sampling=seg_sampling(s), seed=s.seed,
                                        batch_size=s.batch_size, sample_dir=_sample_dir(run))
        out["splits"][split] = res
    if "probes" in s.parts:
        def run_probes():
            train = [sw.generate_scene(i, world, "train") for i in range(s.probe_train_scenes)]
            test = [sw.generate_scene(i, world, "test") for i in range(s.probe_test_scenes)]
            f_train = probes.extract_features(run, train, s.batch_size)
            f_test = probes.extract_features(run, test, s.batch_size)
            res = probes.probe_layers(f_train, probes.probe_labels(train), f_test, probes.probe_labels(test),
                                      l2=s.probe_l2, steps=s.probe_steps)
            res.update(train_scenes=len(train), test_scenes=len(test), train_split="train", test_split="test")
            return res
        out["probes"] = timed("probes", run_probes)
    if "attention" in s.parts:
        def run_attention():
            items = cvbench.mcq_items(world, "test", -(-s.attn_items // len(cvbench.CVBENCH_TASKS)), s.seed)
            rows = attention.generation_rows(world, s.attn_items, s.seed, "test")
            return {"understanding": attention.understanding_shares(
                        run, items, query_tokens=s.attn_query_tokens, batch_size=s.batch_size),
                    "generation": attention.generation_shares(run, rows, batch_size=s.batch_size)}
        out["attention"] = timed("attention", run_attention)
    out["timing_s"]["total"] = round(time.time() - t_all, 2)
    return out


def _sample_dir(run: UMMRun) -> str | None:
    return os.path.join(run.workdir, "eval") if run.workdir else None


def evaluate_workdir(workdir: str, *, step: int = -1, cfg=None, data_dir: str | None = None, write: bool = True,
                     show: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the run in `workdir`, evaluate it by its `eval.umm` section (of `cfg` when given, else of
    the config the run saved), write eval/metrics.json and print the table."""
    run = UMMRun.from_workdir(workdir, step=step, cfg=cfg, data_dir=data_dir)
    metrics = evaluate(run, progress=progress)
    if write:
        metrics["metrics_file"] = write_metrics(workdir, metrics)
    if show:
        print(format_table(metrics))
    return metrics
