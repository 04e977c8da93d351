"""Evaluate a trained run: dispatches on `cfg.stage`; writes WORKDIR/eval/metrics.json (+ figures).

    python tools/evaluate.py --config=configs/vq_shapes.py --workdir=runs/vq [--step=-1]
    python tools/evaluate.py --workdir=runs/sgt [--data_dir=DIR] [--override=mcq_items=96 ...]

    python tools/evaluate.py --workdir=runs/sgt_1b --cvbench_dir=/data/CV-Bench [--cvbench_method=both]

A UMM run needs no --config (its checkpoint holds it); --override sets `eval.umm` fields.
--cvbench_dir scores the run on a local copy of the real CV-Bench instead (sgt_jax/eval/cvbench_real.py)
and writes WORKDIR/eval/cvbench.json.

Stages register an evaluator in `EVALUATORS` (stage name -> fn(cfg, workdir, step) -> metrics).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/ (also where eval/ goes).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step to evaluate (-1 = latest).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "UMM runs: where the dataset / tokenizer live (default: the run's).")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "UMM runs: eval.umm FIELD=VALUE (e.g. mcq_items=96).")
_CVBENCH_DIR = flags.DEFINE_string("cvbench_dir", "", "UMM runs: score the real CV-Bench from this local copy.")
_CVBENCH_METHOD = flags.DEFINE_enum("cvbench_method", "likelihood", ["likelihood", "generate", "both"],
                                    "CV-Bench answers: choice likelihood, greedy generation, or both.")
_CVBENCH_LIMIT = flags.DEFINE_integer("cvbench_limit", 0, "Score only the first N CV-Bench items (0 = all).")
flags.mark_flags_as_required(["workdir"])


def evaluate_cvbench_real(workdir: str, step: int) -> int:
    """The real CV-Bench on a UMM run; prints the table, writes eval/cvbench.json."""
    from sgt_jax.eval import cvbench_real, umm_eval

    try:
        cvbench_real.find_layout(_CVBENCH_DIR.value)
    except FileNotFoundError as e:
        logging.error("--cvbench_dir: %s", e)
        return 2
    if not umm_eval.is_umm_workdir(workdir, step):
        logging.error("--workdir=%r holds no UMM checkpoint", workdir)
        return 2
    run = umm_eval.UMMRun.from_workdir(os.path.abspath(workdir), step=step, data_dir=_DATA_DIR.value or None)
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
    """Restore the VQ params (EMA if the run kept them) and run `sgt_jax.eval.vq_eval`."""
    import flax.linen as nn
    import jax

    from sgt_jax.data import datasets
    from sgt_jax.eval import vq_eval
    from sgt_jax.models import vq as vq_lib
    from sgt_jax.train import checkpoint as ckpt_lib

    datasets.ensure_dataset(cfg)
    model = vq_lib.VQModel(vq_lib.spec_from_config(cfg))
    target = nn.meta.unbox(vq_lib.init_params(model, jax.random.key(0)))
    workdir = os.path.abspath(workdir)  # orbax reads absolute paths only
    params, loaded = ckpt_lib.load_params(workdir, target, step=step)
    n_target = len(jax.tree.leaves(target))
    if len(loaded) != n_target:
        raise ValueError(f"checkpoint in {workdir} filled {len(loaded)} of {n_target} VQ parameter arrays: "
                         "does the config match the run?")
    at = int(ckpt_lib.resolve_step_dir(workdir, step).name)
    return vq_eval.evaluate(cfg, params, out_dir=os.path.join(workdir, "eval"), step=at)


def evaluate_umm(cfg, workdir: str, step: int) -> dict:
    """UMM runs (base / SFT / SGT): `sgt_jax.eval.umm_eval` prints its table and writes
    eval/metrics.json; returns the headline numbers. Model config from the checkpoint unless --config."""
    from sgt_jax.eval import umm_eval

    m = umm_eval.run_cli(workdir, step=step, cfg=cfg, data_dir=_DATA_DIR.value or None, overrides=_OVERRIDE.value)
    return umm_eval.headline(m)


EVALUATORS = {"vq": evaluate_vq, "umm": evaluate_umm}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CVBENCH_DIR.value:
        return evaluate_cvbench_real(_WORKDIR.value, _STEP.value)
    cfg = _CONFIG.value
    from sgt_jax.config import validate
    from sgt_jax.train import checkpoint as ckpt_lib

    try:  # a missing or empty --workdir is named as such, before any --config question
        ckpt_lib.check_run_dir(_WORKDIR.value, _STEP.value)
    except ckpt_lib.RunDirError as e:
        logging.error("%s", e)
        return 2

    if cfg is None:  # no --config: the stage the checkpoint was written by (UMM runs carry their config)
        from sgt_jax.eval import umm_eval

        if not umm_eval.is_umm_workdir(_WORKDIR.value, _STEP.value):
            logging.error("--config is required for %s (only UMM checkpoints are evaluated from their own config)",
                          _WORKDIR.value)
            return 2
        stage = "umm"
    else:
        validate(cfg)
        stage = cfg.stage
    if stage not in EVALUATORS:
        logging.error("no evaluator for stage %r; available: %s", stage, sorted(EVALUATORS))
        return 2
    metrics = EVALUATORS[stage](cfg, _WORKDIR.value, _STEP.value)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
