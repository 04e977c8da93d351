"""The generic training loop: `build_trainer` (mesh, state, jitted step) -> state (fresh, resumed,
or init_from) -> data -> periodic log / eval / checkpoint, with preemption, wall-clock and divergence
stops. `run` is the command-line entry: one finalize + validate before anything is built or written.

Exact resume: the per-step rng is `fold_in(key(seed), step)` and the data iterator state is in the
checkpoint, so N steps + restart + N steps reproduce 2N straight steps bit for bit (on CPU).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax import checks
from sgt_jax.config import ConfigError, finalize
from sgt_jax.data import pipeline
from sgt_jax.train import checkpoint as ckpt_lib
from sgt_jax.train import distributed, sharding
from sgt_jax.train.metrics import TrainLogger, summarize
from sgt_jax.train.stage import get_stage
from sgt_jax.train.trainer import build_trainer

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised after `train.max_consecutive_skips` non-finite steps in a row."""


@dataclasses.dataclass
class TrainResult:
    state: Any
    step: int
    stop_reason: str  # "done" | "preempted" | "wall_clock" | "max_steps"
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    train_step_compiles: int
    resumed_from: int | None


def make_data_iterator(stage, cfg, split: str = "train"):
    """The stage's own iterator if it has one, else the shared grain pipeline with its transform."""
    kw = dict(process_index=jax.process_index(), process_count=jax.process_count(), seed=int(cfg.data.shuffle_seed))
    it = stage.make_iterator(split, global_batch_size=int(cfg.train.batch_size), **kw) \
        if hasattr(stage, "make_iterator") else None
    if it is not None:
        return it
    return pipeline.make_iterator(cfg, split, stage.example_transform(split), **kw)


def _to_global(host_batch: dict, spec: dict, mesh, rules) -> dict:
    """Check one process's batch against the stage's declared spec, then assemble global arrays."""
    per_process = int(next(iter(spec.values())).shape[0]) // jax.process_count()
    out = {}
    for k, s in spec.items():
        if k not in host_batch:
            raise KeyError(f"data batch lacks key {k!r} that the stage's dummy_batch declares; got {sorted(host_batch)}")
        x = np.asarray(host_batch[k])
        want = (per_process,) + tuple(s.shape[1:])
        if x.shape != want or x.dtype != s.dtype:
            raise ValueError(f"data batch[{k!r}] is {x.dtype}{list(x.shape)} but the stage expects "
                             f"{s.dtype}{list(want)} per process (global {list(s.shape)})")
        out[k] = x
    return sharding.host_batch_to_global(out, mesh, rules)


def _agree(flag: bool, step: int, every: int = 10) -> bool:
    """A stop decision every process takes at the same step (else the next collective hangs).
    Multi-process: decided every `every` steps from all processes' flags."""
    if jax.process_count() == 1:
        return flag
    if step % every:
        return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _metadata(cfg, mesh, stage_name: str) -> dict:
    return {"config": cfg.to_json_best_effort(), "stage": stage_name,
            "mesh_shape": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape), strict=True))}


def train(cfg, workdir: str, *, stage=None, max_steps: int | None = None, prepared: bool = False) -> TrainResult:
    """Train `cfg.train.steps` steps in `workdir`, resuming from its latest checkpoint.

    `stage` overrides `get_stage(cfg)` (tests); `max_steps` stops early at that step (and
    checkpoints), as a scheduler time slice would. `prepared=True`: the caller already ran
    `checks.prepare(cfg, jax.device_count())` (as `run` does), so it is not repeated.
    """
    if not prepared:
        checks.prepare(cfg, jax.device_count())
    t_begin = time.time()
    stage = stage if stage is not None else get_stage(cfg)
    total_steps = int(cfg.train.steps)
    stop_at = min(total_steps, max_steps) if max_steps is not None else total_steps
    global_batch = int(cfg.train.batch_size)
    base_key = jax.random.key(int(cfg.seed))

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(cfg.checkpoint.keep),
                                 best_metric=cfg.checkpoint.best_metric, best_mode=cfg.checkpoint.best_mode,
                                 async_save=bool(cfg.checkpoint.async_save))
    latest = ckpt.latest_step()
    trainer = build_trainer(cfg, stage=stage, materialize=latest is None, seed_key=base_key)
    mesh, rules, setup, jstep = trainer.mesh, trainer.rules, trainer.setup, trainer.jstep
    sharding.check_process_batch_layout(mesh, rules, global_batch)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
    data_iter = make_data_iterator(stage, cfg, "train")
    if latest is not None:
        state, meta, _ = ckpt.restore(setup.abstract, step=latest, data_iter=data_iter)
        log.info("resumed from %s step %d", ckpt.directory, latest)
    else:
        state = setup.state
        if cfg.init_from.path:
            params, loaded = ckpt_lib.load_params(cfg.init_from.path, state.params, mapping=cfg.init_from.mapping,
                                                  step=int(cfg.init_from.step))
            state = state.replace(params=params,
                                  ema_params=None if state.ema_params is None else jax.tree.map(jnp.copy, params))
            log.info("init_from %s: %d parameter arrays loaded", cfg.init_from.path, len(loaded))
    log.info("params: %s total, %s trainable", f"{trainer.n_params:,}", f"{trainer.n_trainable:,}")

    logger = TrainLogger(workdir, total_steps=total_steps, log_every=int(cfg.train.log_every),
                         global_batch=global_batch, flops_per_example=stage.flops_per_example(),
                         tokens_per_example=stage.tokens_per_example(),
                         peak_tflops=float(cfg.train.peak_tflops_per_device),
                         tensorboard=bool(cfg.train.tensorboard), profile_start=int(cfg.train.profile_start_step),
                         profile_steps=int(cfg.train.profile_num_steps))
    preempt = ckpt_lib.PreemptionWatcher()
    metadata = _metadata(cfg, mesh, cfg.stage)
    step_rng = jax.random.fold_in(base_key, 1)
    every_ckpt, every_eval = int(cfg.checkpoint.every_steps), int(cfg.eval.every_steps)
    max_skips = int(cfg.train.max_consecutive_skips)
    wall_limit = float(cfg.train.max_wall_minutes) * 60.0
    eval_metrics: dict[str, float] = {}
    eval_step = -1
    best_metric = cfg.checkpoint.best_metric
    stop_reason = "done" if stop_at == total_steps else "max_steps"
    step = int(jax.device_get(state.step))
    resumed_from = latest
    last_saved = latest
    prev_metrics = None

    def run_eval(st, at):
        res = stage.evaluate(st.eval_params(), st.model_state, step=at, workdir=workdir) or {}
        logger.write_eval(at, res)
        return {k: float(v) for k, v in res.items()}

    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            logger.start(step)
            while step < stop_at:
                batch = _to_global(next(data_iter), setup.example_spec, mesh, rules)
                state, metrics = jstep(state, batch, jax.random.fold_in(step_rng, step))
                step += 1
                if step == 1 or prev_metrics is None:
                    logger.start(step)  # throughput excludes the first compile
                logger.step(step, metrics)
                # Divergence check one step behind, so it never stalls the dispatch pipeline.
                if prev_metrics is not None and float(prev_metrics["consecutive_skips"]) >= max_skips:
                    raise TrainingDiverged(
                        f"stopping at step {step - 1}: {int(float(prev_metrics['consecutive_skips']))} consecutive "
                        f"steps had a non-finite loss or gradient (train.max_consecutive_skips={max_skips}); the "
                        f"last checkpoint is step {last_saved}")
                prev_metrics = metrics
                is_ckpt = step % every_ckpt == 0 and step < stop_at
                # Keep-best needs the metric at every checkpoint, so checkpoints also evaluate then.
                if step < stop_at and ((every_eval and step % every_eval == 0) or (is_ckpt and best_metric)):
                    eval_metrics = run_eval(state, step)
                    eval_step = step
                if is_ckpt:
                    ckpt.save(step, state, data_iter, metadata=metadata,
                              metrics=eval_metrics if eval_step == step else None)
                    last_saved = step
                if preempt.reached(step):
                    stop_reason = "preempted"
                    break
                if wall_limit and _agree(time.time() - t_begin > wall_limit, step):
                    stop_reason = "wall_clock"
                    log.warning("train.max_wall_minutes=%s reached at step %d", cfg.train.max_wall_minutes, step)
                    break
            if prev_metrics is not None and float(prev_metrics["consecutive_skips"]) >= max_skips:
                raise TrainingDiverged(
                    f"stopping at step {step}: {int(float(prev_metrics['consecutive_skips']))} consecutive steps "
                    f"had a non-finite loss or gradient (train.max_consecutive_skips={max_skips}); the last "
                    f"checkpoint is step {last_saved}")
            logger.flush(step)
            if stop_reason == "done" and step == total_steps and step != resumed_from:
                eval_metrics = run_eval(state, step)
            if last_saved != step:
                ckpt.save(step, state, data_iter, metadata=metadata,
                          metrics=eval_metrics if stop_reason == "done" else None, force=True)
                if stop_reason == "preempted":
                    log.warning("preemption checkpoint saved at step %d", step)
    finally:
        preempt.close()
        ckpt.close()
        logger.close()
    summary = summarize(logger.history)
    compiles = jstep._cache_size() if hasattr(jstep, "_cache_size") else -1
    log.info("finished at step %d (%s) in %.1fs; train step compiled %d time(s)", step, stop_reason,
             time.time() - t_begin, compiles)
    return TrainResult(state=state, step=step, stop_reason=stop_reason, metrics=summary, eval_metrics=eval_metrics,
                       train_step_compiles=compiles, resumed_from=resumed_from)


class _DropLibraryChatter(logging.Filter):
    """Orbax logs several INFO lines per save through absl; keep its warnings, drop the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname.replace(os.sep, "/")


def quiet_library_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropLibraryChatter())
    logging.getLogger("sgt_jax").setLevel(logging.INFO)


def _log_to_file(workdir: str) -> None:
    """Also write every log line to WORKDIR/train.log (appending across resumes)."""
    os.makedirs(workdir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(workdir, "train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s] %(message)s"))
    handler.addFilter(_DropLibraryChatter())
    logging.getLogger().addHandler(handler)


def run(cfg, workdir: str, *, stage=None) -> int:
    """Command-line entry (tools/train.py): finalize, distributed init, the one validation (every
    rule, files included), then train. Returns an exit code (2 = invalid config, nothing written)."""
    quiet_library_logs()
    try:
        finalize(cfg)  # derived fields, after every override
        distributed.maybe_initialize(cfg)
        checks.validate(cfg, jax.device_count(), paths=True)
        if stage is None:
            stage = get_stage(cfg)  # stage construction reads the config too: still before any file
    except ConfigError as e:
        log.error("invalid config: %s", e)
        return 2
    if jax.process_index() == 0:  # only now: a rejected config leaves no files behind
        _log_to_file(workdir)
    try:
        result = train(cfg, workdir, stage=stage, prepared=True)
    except TrainingDiverged as e:
        log.error("%s", e)
        return 3
    if result.stop_reason == "preempted":
        log.warning("preempted at step %d; checkpoint saved. Re-run the same command to resume.", result.step)
    elif result.stop_reason == "wall_clock":
        log.warning("wall-clock limit reached at step %d; checkpoint saved. Re-run to continue.", result.step)
    else:
        log.info("done: step %d; last metrics %s; eval %s", result.step,
                 {k: round(v, 5) for k, v in result.metrics.items() if k.startswith("train/loss")},
                 result.eval_metrics)
    return 0
