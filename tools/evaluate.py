"""Evaluate a trained run: dispatches on the stage; writes WORKDIR/eval/metrics.json (+ figures).

    python tools/evaluate.py --config=configs/vq_shapes.py --workdir=runs/vq [--step=-1]
    python tools/evaluate.py --workdir=runs/sgt [--data_dir=DIR] [--config.eval.umm.mcq_items=96 ...]

    python tools/evaluate.py --workdir=runs/sgt_1b --cvbench_dir=/data/CV-Bench [--cvbench_method=both]

A UMM run needs no --config: its checkpoint holds the config it trained with, and
`--config.eval.umm.FIELD=VALUE` overrides (the same flags as everywhere) are applied to it; without
--config only `eval.*` fields may be overridden. Exit code 2 for user errors (bad flags, a workdir
without a checkpoint, an invalid config). --cvbench_dir scores the run on a local copy of the real
CV-Bench instead (sgt_jax/eval/cvbench_real.py) and writes WORKDIR/eval/cvbench.json.

Stages register an evaluator in `EVALUATORS` (stage name -> fn(cfg, workdir, step) -> metrics).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sgt_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = cli.define_config_file(
    "config", os.path.join(ROOT, "configs", "defaults.py"),
    "Experiment config file (path[:arg]); default: the config the UMM run saved.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/ (also where eval/ goes).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step to evaluate (-1 = latest).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "UMM runs: where the dataset / tokenizer live (default: the run's).")
_CVBENCH_DIR = flags.DEFINE_string("cvbench_dir", "", "UMM runs: score the real CV-Bench from this local copy.")
_CVBENCH_METHOD = flags.DEFINE_enum("cvbench_method", "likelihood", ["likelihood", "generate", "both"],
                                    "CV-Bench answers: choice likelihood, greedy generation, or both.")
_CVBENCH_LIMIT = flags.DEFINE_integer("cvbench_limit", 0, "Score only the first N CV-Bench items (0 = all).")
flags.mark_flags_as_required(["workdir"])


def evaluate_cvbench_real(workdir: str, step: int) -> int:
    """The real CV-Bench on a UMM run; prints the table, writes eval/cvbench.json."""
    from sgt_jax.eval import cvbench_real
    from sgt_jax.eval.umm_run import UMMRun
    from sgt_jax.train import restore

    try:
        cvbench_real.find_layout(_CVBENCH_DIR.value)
    except FileNotFoundError as e:
        logging.error("--cvbench_dir: %s", e)
        return 2
    if restore.saved_stage(os.path.abspath(workdir), step) != "umm":
        logging.error("--workdir=%r holds no UMM checkpoint", workdir)
        return 2
    run = UMMRun.from_workdir(os.path.abspath(workdir), step=step, data_dir=_DATA_DIR.value or None)
    res = cvbench_real.evaluate(run, _CVBENCH_DIR.value, method=_CVBENCH_METHOD.value,
                                batch_size=int(run.cfg.eval.umm.batch_size), limit=_CVBENCH_LIMIT.value or None)
    res["step"], res["cvbench_dir"] = int(run.step), os.path.abspath(_CVBENCH_DIR.value)
    path = os.path.join(workdir, "eval", "cvbench.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(cvbench_real.format_table(res))
    print(f"wrote {path}")
    return 0


def evaluate_vq(cfg, workdir: str, step: int) -> dict:
    """Restore the VQ params (EMA if the run kept them) and run `sgt_jax.train.stages.vq_eval`."""
    import flax.linen as nn
    import jax

    from sgt_jax.data import datasets
    from sgt_jax.models import vq as vq_lib
    from sgt_jax.train import checkpoint as ckpt_lib
    from sgt_jax.train.stages import vq_eval

    datasets.ensure_dataset(cfg)
    model = vq_lib.VQModel(vq_lib.spec_from_config(cfg))
    target = nn.meta.unbox(vq_lib.init_params(model, jax.random.key(0)))
    params, loaded = ckpt_lib.load_params(workdir, target, step=step)
    n_target = len(jax.tree.leaves(target))
    if len(loaded) != n_target:
        raise ValueError(f"checkpoint in {workdir} filled {len(loaded)} of {n_target} VQ parameter arrays: "
                         "does the config match the run?")
    at = int(ckpt_lib.resolve_step_dir(workdir, step).name)
    return vq_eval.evaluate(cfg, params, out_dir=os.path.join(workdir, "eval"), step=at)


def evaluate_umm(cfg, workdir: str, step: int) -> dict:
    """UMM runs (base / SFT / SGT): `sgt_jax.eval.umm_eval` prints its table and writes
    eval/metrics.json; returns the headline numbers."""
    from sgt_jax.eval import umm_eval, umm_results

    m = umm_eval.evaluate_workdir(workdir, step=step, cfg=cfg, data_dir=_DATA_DIR.value or None,
                                  progress=lambda msg: print(msg, flush=True))
    return umm_results.headline(m)


EVALUATORS = {"vq": evaluate_vq, "umm": evaluate_umm}


def resolve_config(workdir: str, step: int):
    """-> (config, stage): --config (finalized) if given, else the UMM run's saved config with the
    `--config.eval.*` overrides applied. Raises ConfigError / FileNotFoundError for user errors."""
    from sgt_jax import checks
    from sgt_jax.config import ConfigError
    from sgt_jax.train import restore

    if flags.FLAGS["config"].present:
        cfg = checks.prepare(_CONFIG.value)
        return cfg, cfg.stage
    stage = restore.saved_stage(workdir, step)
    if stage is None:
        raise FileNotFoundError(f"--workdir={workdir!r} holds no checkpoint (looked for {workdir}/checkpoints); "
                                "pass the directory a training run wrote")
    if stage != "umm":
        raise ConfigError(f"--workdir={workdir!r} is a {stage!r}-stage run: pass its --config (only UMM runs are "
                          "evaluated from the config they saved)")
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    bad = sorted(k for k in overrides if not k.startswith("eval."))
    if bad:
        raise ConfigError(f"--config.{bad[0]} changes the model or data of a saved run; without --config only "
                          "--config.eval.* fields may be overridden")
    cfg = restore.saved_config(workdir, step)
    cfg.update_from_flattened_dict(overrides)
    return checks.validate(cfg), "umm"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CVBENCH_DIR.value:
        return evaluate_cvbench_real(_WORKDIR.value, _STEP.value)
    from sgt_jax.config import ConfigError
    from sgt_jax.train import checkpoint as ckpt_lib

    try:  # a missing or empty --workdir is named as such, before any --config question
        ckpt_lib.check_run_dir(_WORKDIR.value, _STEP.value)
    except ckpt_lib.RunDirError as e:
        logging.error("%s", e)
        return 2

    workdir = os.path.abspath(_WORKDIR.value)  # orbax reads absolute paths only
    try:
        cfg, stage = resolve_config(workdir, _STEP.value)
    except (ConfigError, FileNotFoundError) as e:
        logging.error("%s", e)
        return 2
    if stage not in EVALUATORS:
        logging.error("no evaluator for stage %r; available: %s", stage, sorted(EVALUATORS))
        return 2
    metrics = EVALUATORS[stage](cfg, workdir, _STEP.value)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    cli.run(lambda argv: sys.exit(main(argv)))
