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
from etils import epath

from sgt_jax import checks
from sgt_jax.config import ConfigError, finalize
from sgt_jax.data import pipeline
from sgt_jax.train import checkpoint as ckpt_lib
from sgt_jax.train import distributed, sharding, workdir_lock
from sgt_jax.train.metrics import TrainLogger, summarize
from sgt_jax.train.stage import get_stage
from sgt_jax.train.trainer import build_trainer

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised after `train.max_consecutive_skips` non-finite steps in a row."""


def _diverged_message(ckpt, at: int, skips: int, max_skips: int) -> str:
    """Move aside the checkpoints no finite update followed, and name the newest good one."""
    rejected = ckpt.reject_unconfirmed()
    good = ckpt.newest_confirmed()
    msg = (f"stopping at step {at}: {skips} consecutive steps had a non-finite loss, gradient or update "
           f"(train.max_consecutive_skips={max_skips}); no update was applied in that streak. ")
    if rejected:
        msg += (f"Checkpoint step(s) {rejected} were followed only by non-finite steps and were moved to "
                f"{ckpt.directory.parent / ckpt_lib.REJECTED_DIR}. ")
    if good is None:
        msg += "No finite checkpoint is left in this workdir: lower optim.lr (or fix the data) and start again."
    else:
        msg += (f"The newest finite checkpoint is step {good}: re-running resumes from it "
                "(lower optim.lr first).")
    return msg


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


def _lock_workdir(workdir: str):
    """Process 0 takes the workdir lock; every process raises WorkdirLocked if it failed (so the
    others do not wait at the next collective for a process that is exiting)."""
    lock, err = None, None
    if jax.process_index() == 0:
        try:
            lock = workdir_lock.acquire(workdir)
        except workdir_lock.WorkdirLocked as e:
            err = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = bool(np.any(multihost_utils.process_allgather(np.int32(err is not None))))
        if failed and err is None:
            err = workdir_lock.WorkdirLocked(f"process 0 could not lock {workdir}: another run holds it")
    if err is not None:
        raise err
    return lock


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

    # One run per workdir: taken on process 0 before anything is written (re-entrant with run()).
    lock = _lock_workdir(workdir)
    try:
        return _train_locked(cfg, workdir, stage, total_steps, stop_at, global_batch, base_key, t_begin)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg, workdir, stage, total_steps, stop_at, global_batch, base_key, t_begin):
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(cfg.checkpoint.keep),
                                 best_metric=cfg.checkpoint.best_metric, best_mode=cfg.checkpoint.best_mode,
                                 async_save=bool(cfg.checkpoint.async_save))
    ckpt.set_run_config(cfg)
    latest = ckpt.latest_step()
    trainer = build_trainer(cfg, stage=stage, materialize=latest is None, seed_key=base_key)
    mesh, rules, setup, jstep = trainer.mesh, trainer.rules, trainer.setup, trainer.jstep
    sharding.check_process_batch_layout(mesh, rules, global_batch)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
    data_iter = make_data_iterator(stage, cfg, "train")
    if latest is not None:
        # The newest step that verifies (checksums, finiteness); newer ones that fail are moved aside.
        state, meta, latest = ckpt.restore(setup.abstract, data_iter=data_iter)
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
                         profile_steps=int(cfg.train.profile_num_steps),
                         start_step=int(jax.device_get(state.step)))
    preempt = ckpt_lib.PreemptionWatcher(ckpt.manager)
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
    if latest is None and cfg.checkpoint.save_initial:
        # The starting state is good by definition (no update made it): confirmed at once, so a run
        # whose first updates diverge still has it to restart from.
        if ckpt.save(0, state, data_iter, metadata=metadata, confirmed=True):
            last_saved = 0

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
                if prev_metrics is not None:
                    prev_skips = int(float(prev_metrics["consecutive_skips"]))
                    if prev_skips == 0:  # the update to step-1 was applied: states up to step-2 are good
                        ckpt.confirm(step - 2)
                    if prev_skips >= max_skips:
                        raise TrainingDiverged(_diverged_message(ckpt, step - 1, prev_skips, max_skips))
                prev_metrics = metrics
                is_ckpt = step % every_ckpt == 0 and step < stop_at
                # Keep-best needs the metric at every checkpoint, so checkpoints also evaluate then.
                if step < stop_at and ((every_eval and step % every_eval == 0) or (is_ckpt and best_metric)):
                    eval_metrics = run_eval(state, step)
                    eval_step = step
                if is_ckpt:
                    skips_now = int(float(metrics["consecutive_skips"]))
                    if skips_now:  # the state is the last good one, but it may be what fails: wait
                        log.warning("step %d: checkpoint paused (%d step(s) in a row skipped as non-finite)",
                                    step, skips_now)
                    elif ckpt.save(step, state, data_iter, metadata=metadata,
                                   metrics=eval_metrics if eval_step == step else None):
                        last_saved = step
                if preempt.reached(step):
                    stop_reason = "preempted"
                    break
                if wall_limit and _agree(time.time() - t_begin > wall_limit, step):
                    stop_reason = "wall_clock"
                    log.warning("train.max_wall_minutes=%s reached at step %d", cfg.train.max_wall_minutes, step)
                    break
            last_skips = int(float(prev_metrics["consecutive_skips"])) if prev_metrics is not None else 0
            if prev_metrics is not None and last_skips == 0:
                ckpt.confirm(step - 1)
            if last_skips >= max_skips:
                raise TrainingDiverged(_diverged_message(ckpt, step, last_skips, max_skips))
            logger.flush(step)
            if stop_reason == "done" and step == total_steps and step != resumed_from:
                eval_metrics = run_eval(state, step)
            if last_saved != step and last_skips:
                log.warning("not saving step %d: the last %d step(s) were skipped as non-finite; newest good "
                            "checkpoint: %s", step, last_skips, ckpt.newest_confirmed())
            elif last_saved != step:
                ckpt.save(step, state, data_iter, metadata=metadata,
                          metrics=eval_metrics if stop_reason == "done" else None, force=True)
                if stop_reason == "preempted":
                    log.warning("preemption checkpoint saved at step %d", step)
    finally:
        preempt.close()
        ckpt.close()
        logger.close()
    summary = summarize(logger.history)
    compiles = jstep.trace_count()
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
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # epath: gs:// workdirs as well as local ones
    handler = logging.StreamHandler(epath.Path(workdir, "train.log").open("a"))
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
    lock = None
    try:
        lock = _lock_workdir(workdir)  # before the first write (train.log); a rejected config wrote nothing
        if jax.process_index() == 0:
            _log_to_file(workdir)
        result = train(cfg, workdir, stage=stage, prepared=True)
    except TrainingDiverged as e:
        log.error("%s", e)
        return 3
    except workdir_lock.WorkdirLocked as e:
        log.error("%s", e)
        return 2
    except (ckpt_lib.CheckpointMismatch, ckpt_lib.CheckpointCorrupt) as e:
        log.error("cannot resume: %s", e)
        return 2
    finally:
        if lock is not None:
            lock.release()
    if result.stop_reason == "preempted":
        log.warning("preempted at step %d; checkpoint saved. Re-run the same command to resume.", result.step)
    elif result.stop_reason == "wall_clock":
        log.warning("wall-clock limit reached at step %d; checkpoint saved. Re-run to continue.", result.step)
    else:
        log.info("done: step %d; last metrics %s; eval %s", result.step,
                 {k: round(v, 5) for k, v in result.metrics.items() if k.startswith("train/loss")},
                 result.eval_metrics)
    return 0
