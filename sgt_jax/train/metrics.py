"""Training metrics: clu metric writers (TensorBoard + log lines), progress/ETA, throughput, MFU, and a
jax.profiler trace over a configured step window.

clu's writers import TensorFlow, so they are imported here lazily (only when a logger is built with
`tensorboard=True`); the train step and models never import this module at trace time.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from sgt_jax.train import flops as flops_lib

log = logging.getLogger(__name__)
METRICS_JSONL = "metrics.jsonl"  # per-run scalar history next to the TensorBoard events

# Summed (not averaged) over the steps between two log lines.
_SUMMED = ("skipped",)
# Last value wins.
_LAST = ("consecutive_skips", "total_skips", "lr")


class Ratio(NamedTuple):
    """A metric a stage returns as (sum, count) over its tokens: the train step sums both over
    micro-batches and divides once, so the value is the batch's token mean, and NaN (not a step's
    NaN poisoning the others) only when no micro-batch had any such token."""
    total: Any
    count: Any


class _LogWriter:
    """Minimal stand-in for a clu writer when TensorBoard is off: readable log lines only."""

    def write_scalars(self, step, scalars):
        log.info("[%d] %s", step, ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items())))

    def write_hparams(self, hparams):
        log.info("hparams: %s", hparams)

    def flush(self):
        pass

    def close(self):
        pass


def _fmt(v) -> str:
    v = float(v)
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.4e}"


class TrainLogger:
    """Collects per-step device metrics and writes averaged scalars every `log_every` steps.

    Only process 0 writes event files; every process logs. Device metrics are fetched only at log
    steps, so logging does not add a host sync per step.
    """

    def __init__(self, workdir: str, *, total_steps: int, log_every: int, global_batch: int,
                 flops_per_example: float, tokens_per_example: float, peak_tflops: float = 0.0,
                 tensorboard: bool = True, profile_start: int = -1, profile_steps: int = 5,
                 start_step: int | None = None):
        self.workdir = workdir
        self.total_steps = total_steps
        self.log_every = max(int(log_every), 1)
        self.global_batch = global_batch
        self.flops_per_example = float(flops_per_example)
        self.tokens_per_example = float(tokens_per_example)
        self.num_devices = jax.device_count()
        self.peak = flops_lib.peak_tflops_per_device(peak_tflops)
        self.primary = jax.process_index() == 0
        self.profile_start, self.profile_steps = int(profile_start), int(profile_steps)
        self._profiling = False
        self._pending: list[dict] = []
        self._t_last = None
        self._steps_since = 0
        self._rate_ema = None
        self.report = None
        if tensorboard:
            from clu import metric_writers, periodic_actions  # imports TensorFlow: keep lazy
            self.writer = metric_writers.create_default_writer(
                os.path.join(workdir, "tensorboard"), just_logging=not self.primary, asynchronous=True)
            self.report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=self.writer,
                                                          every_steps=self.log_every, every_secs=None)
        else:
            self.writer = _LogWriter()
        self.history: list[tuple[int, dict[str, float]]] = []
        if self.primary and start_step is not None:
            self._drop_rows_after(int(start_step))

    def start(self, step: int) -> None:
        """Mark the time origin (after compilation) so throughput excludes compile time."""
        self._t_last = time.perf_counter()
        self._steps_since = 0
        self._start_step = step

    def write_hparams(self, hparams: dict) -> None:
        if self.primary:
            self.writer.write_hparams(hparams)

    def step(self, step: int, metrics: dict) -> dict[str, float] | None:
        """Record metrics of the step that just produced `step` (1-based). Returns the written
        scalars on log steps, else None."""
        self._maybe_profile(step)
        self._pending.append(metrics)
        self._steps_since += 1
        if self.report is not None:
            self.report(step)
        if step % self.log_every and step != self.total_steps:
            return None
        return self.flush(step)

    def flush(self, step: int) -> dict[str, float] | None:
        if not self._pending:
            return None
        host = jax.device_get(self._pending)  # blocks until these steps are done
        now = time.perf_counter()
        out: dict[str, float] = {}
        for k in host[-1]:
            vals = np.asarray([h[k] for h in host], np.float64)
            if k in _SUMMED:
                out[k] = float(vals.sum())
            elif k in _LAST:
                out[k] = float(vals[-1])
            elif np.isnan(vals).all():  # e.g. a task absent from every batch in this window
                out[k] = float("nan")
            else:  # per-task losses are NaN on steps without that task: average the others
                out[k] = float(np.nanmean(vals))
        scalars = {f"train/{k}": v for k, v in out.items()}
        if self._t_last is not None:
            tp = flops_lib.throughput(steps=self._steps_since, seconds=now - self._t_last,
                                      global_batch=self.global_batch, flops_per_example=self.flops_per_example,
                                      tokens_per_example=self.tokens_per_example, num_devices=self.num_devices,
                                      peak_tflops=self.peak)
            scalars.update({f"perf/{k}": v for k, v in tp.items()})
            if tp:
                rate = tp["steps_per_sec"]
                self._rate_ema = rate if self._rate_ema is None else 0.7 * self._rate_ema + 0.3 * rate
                scalars["perf/eta_minutes"] = (self.total_steps - step) / self._rate_ema / 60.0
        self._pending.clear()
        self._t_last, self._steps_since = now, 0
        if self.primary:
            self.writer.write_scalars(step, scalars)
            self._append_jsonl(step, scalars)
        self.history.append((step, scalars))
        return scalars

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint: drop their old rows (written
        before the interruption) so every step appears once, from the run that the state descends from."""
        path = os.path.join(self.workdir, METRICS_JSONL)
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a row cut by a crash mid-write
            if row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)
            log.info("%s: dropped %d row(s) after step %d (they are replayed from the checkpoint)",
                     path, len(lines) - len(kept), step)

    def _append_jsonl(self, step: int, scalars: dict[str, float]) -> None:
        """WORKDIR/metrics.jsonl: one line per log step, readable without TensorFlow (reports, plots)."""
        row = {"step": int(step), **{k: (None if v != v else float(v)) for k, v in scalars.items()}}
        with open(os.path.join(self.workdir, METRICS_JSONL), "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.primary and metrics:  # both writers also log a readable line
            self.writer.write_scalars(step, {k: float(v) for k, v in metrics.items()})
            self._append_jsonl(step, {k: float(v) for k, v in metrics.items()})

    def _maybe_profile(self, step: int) -> None:
        if self.profile_start < 0:
            return
        if not self._profiling and step == self.profile_start:
            jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
            self._profiling = True
            self._profile_end = step + self.profile_steps
        elif self._profiling and step >= self._profile_end:
            jax.profiler.stop_trace()
            self._profiling = False
            log.info("profile written to %s", os.path.join(self.workdir, "profile"))

    def close(self) -> None:
        if self._profiling:
            jax.profiler.stop_trace()
            self._profiling = False
        self.writer.flush()
        self.writer.close()


def summarize(history: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
    """Last logged value of each scalar (for the loop's return value / tests)."""
    out: dict[str, Any] = {}
    for step, scalars in history:
        out.update(scalars)
        out["step"] = step
    return out
