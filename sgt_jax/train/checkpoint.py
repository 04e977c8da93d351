"""Orbax checkpoints: train state + grain iterator state + JSON metadata in one step directory.

Layout: <workdir>/checkpoints/<step>/{state, data, metadata}. Saves are async (the device->host copy
is blocking, the write is not), old steps are pruned by preservation policies (latest N, plus the
best N by an eval metric), SIGTERM triggers a save before exit, and restore takes an abstract target
so a checkpoint written on one mesh loads onto any other.

Verified checkpoints: Orbax has no content checksum (zarr3 checksums only the shard index), so every
save records, in the metadata item, a 32-bit checksum per array (computed in-graph on the sharded
arrays, so it is the same on any mesh) and the finiteness of params and optimizer state. Restore
recomputes both and falls back to the newest older step that verifies; failed steps are moved to
`rejected_checkpoints/` (never deleted). A step counts towards `keep` only once confirmed: restored
and verified, or followed by an applied (finite) train step, so a bad newest step never prunes a
good one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm

from sgt_jax.train.optim import path_str
from sgt_jax.train.state import TrainState

PyTree = Any
log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "metadata"
INTEGRITY = "integrity"  # key of the checksum record inside the metadata item
CHECKSUM_ALGORITHM = "mix32-sum/v1"
REJECTED_DIR = "rejected_checkpoints"


class CheckpointCorrupt(RuntimeError):
    """A step failed to read or verify (bytes, JSON, checksum or finiteness)."""

    def __init__(self, step: int, item: str, file: str, detail: str):
        self.step, self.item, self.file, self.detail = step, item, file, detail
        super().__init__(f"checkpoint step {step} item {item!r} ({file}): {detail}")


class CheckpointMismatch(ValueError):
    """The checkpoint was written for a different model (a user error, not corruption)."""


def _grain_handler():
    import grain.checkpoint as gc  # grain registers its Orbax handler on import
    return gc.CheckpointHandler, gc.CheckpointSave, gc.CheckpointRestore


def versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "sgt_jax"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# Replica-parallel saving splits each replicated array across its replicas, which costs one small
# compiled slice per (array shape, device): seconds per save for models with many small params on
# simulated CPU devices. Only arrays whose per-replica slice is at least this large use it. (The
# public ArrayHandler constructor leaves Orbax's per-array metadata store off; that store only
# matters for typed PRNG-key arrays, which the train state does not hold.)
_MIN_REPLICA_SLICE_BYTES = 1 << 20
_handler_configured = False


def _configure_array_handler() -> None:
    global _handler_configured
    if _handler_configured:
        return
    _handler_configured = True
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


# ---------------------------------------------------------------------------------------------
# integrity: per-array checksums and finiteness, computed in-graph
# ---------------------------------------------------------------------------------------------
def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (one per element; 8/16-bit types widened)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    if bits == 64:  # only with jax_enable_x64: fold both halves
        u = jax.lax.bitcast_convert_type(x, jnp.uint64)
        return (u ^ (u >> 32)).astype(jnp.uint32)
    u = jax.lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits])
    return u.astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
    """Order-independent hash: a murmur3 finalizer of (word ^ position) summed mod 2**32. Integer
    sums are exact in any reduction order, so the value does not depend on the sharding."""
    x = jnp.asarray(x)
    w = _words(x)
    pos = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= w.shape[d]
    v = w ^ (pos * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15))
    v = v ^ (v >> 16)
    v = v * jnp.uint32(0x85EBCA6B)
    v = v ^ (v >> 13)
    v = v * jnp.uint32(0xC2B2AE35)
    v = v ^ (v >> 16)
    return jnp.sum(v, dtype=jnp.uint32)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


_FINITE_PARTS = ("params", "opt_state", "ema_params")


@jax.jit
def _integrity_arrays(tree: dict) -> tuple[list, dict]:
    sums = [_array_checksum(x) for x in jax.tree.leaves(tree)]
    finite = {k: _all_finite(tree[k]) for k in _FINITE_PARTS if k in tree}
    return sums, finite


def state_integrity(tree: dict) -> dict:
    """{"algorithm", "checksums": {path: int}, "finite": {part: bool}} of a state tree (global arrays)."""
    sums, finite = jax.device_get(_integrity_arrays(tree))
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return {"algorithm": CHECKSUM_ALGORITHM, "checksums": {p: int(s) for p, s in zip(paths, sums, strict=True)},
            "finite": {k: bool(v) for k, v in finite.items()}}


# ---------------------------------------------------------------------------------------------
# keep: only confirmed steps count
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _ConfirmedOnly:
    """Applies `inner` to confirmed steps only; unconfirmed steps are always preserved, so a newest
    step that later proves bad (non-finite next step, failed verification) never prunes a good one."""

    inner: Any
    unconfirmed: set

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        confirmed = [c for c in checkpoints if c.step not in self.unconfirmed]
        keep = dict(zip((c.step for c in confirmed), self.inner.should_preserve(confirmed, context=context),
                        strict=True)) if confirmed else {}
        return [keep.get(c.step, True) for c in checkpoints]


def _bad_json_files(step_dir: epath.Path) -> list[str]:
    """JSON files under a step directory that do not parse (to name them in errors)."""
    bad = []
    for f in sorted([*step_dir.glob("*"), *step_dir.glob("*/*")]):  # JSON lives at most one level down
        if f.is_file() and (f.suffix == ".json" or f.name in ("_METADATA", "_CHECKPOINT_METADATA", "metadata",
                                                             "_sharding")):
            try:
                json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError):
                bad.append(str(f))
    return bad


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


class Checkpointer:
    """Thin policy layer over `ocp.CheckpointManager` for the training loop."""

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str = "", best_mode: str = "max",
                 async_save: bool = True, read_only: bool = False, verify: bool = True):
        """`verify=False` skips the checksum record at save and its check at restore (for measuring
        its cost with tools/bench_checkpoint.py; training always verifies)."""
        self.directory = epath.Path(directory).absolute()  # orbax needs absolute paths
        self.verify = verify
        self.best_metric, self.best_mode = best_metric, best_mode
        self.read_only = read_only
        self.unconfirmed: set[int] = set()
        policies = [cm.LatestN(n=keep)]
        if best_metric:
            # BestN sorts ascending and keeps the tail: reverse for "min".
            policies.append(cm.BestN(get_metric_fn=lambda m: float(m[best_metric]), reverse=(best_mode == "min"),
                                     n=keep, keep_checkpoints_without_metrics=False))
        inner = cm.AnyPreservationPolicy(policies) if len(policies) > 1 else policies[0]
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_ConfirmedOnly(inner, self.unconfirmed),
            # best_fn makes the manager write per-step metrics (which BestN ranks) and answer best_step().
            best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        grain_handler, _, _ = _grain_handler()
        _configure_array_handler()
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler(),
                           DATA: grain_handler()})

    # ---- queries ----
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        """Kept step with the best `best_metric` (latest step when no metric is tracked)."""
        return self.manager.best_step()

    def confirm(self, up_to: int) -> None:
        """Steps <= `up_to` are known good (a later update from them was finite): they count for keep."""
        self.unconfirmed.difference_update({s for s in self.unconfirmed if s <= up_to})

    def newest_confirmed(self) -> int | None:
        good = [s for s in self.all_steps() if s not in self.unconfirmed]
        return good[-1] if good else None

    # ---- save / restore ----
    def save(self, step: int, state: TrainState, data_iter=None, *, metadata: dict | None = None,
             metrics: dict | None = None, force: bool = False, confirmed: bool = False) -> bool:
        """Queue an async save of everything at `step`; returns whether a save was started.

        A state with non-finite params or optimizer state is never written (it would only be
        something to fall back from). `confirmed`: the state is known good without a later finite
        update (the run's starting state), so it counts for `keep` at once."""
        _, save_cls, _ = _grain_handler()
        tree = state.to_tree()
        integrity = state_integrity(tree) if self.verify else None
        bad = [k for k, ok in integrity["finite"].items() if not ok] if integrity else []
        if bad:
            log.error("not saving step %d: %s hold non-finite values; newest good checkpoint: %s", step,
                      " and ".join(bad), self.newest_confirmed())
            return False
        meta = {"step": int(step), "time": time.time(), "versions": versions(),
                "process_count": jax.process_count(), "device_count": jax.device_count()}
        meta.update(metadata or {})
        if integrity is not None:
            meta[INTEGRITY] = integrity
        items = {STATE: ocp.args.StandardSave(tree), META: ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items[DATA] = save_cls(data_iter)
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
            if self.best_metric and self.best_metric not in metrics:
                metrics = None
        if not confirmed:
            self.unconfirmed.add(int(step))
        return self.manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None, data_iter=None
                ) -> tuple[TrainState, dict, int]:
        """Restore onto the shardings carried by `abstract_state` (any mesh) and verify it.

        `step=None`: the newest step that verifies; newer ones that fail are logged (step, item,
        file), moved to `rejected_checkpoints/` unless read-only, and the fallback is warned about.
        An explicit `step` raises `CheckpointCorrupt` instead. `data_iter` is restored in place when
        the checkpoint has this process count's iterator state. A checkpoint of another model
        shape raises `CheckpointMismatch`.
        """
        if step is not None:
            return self._restore_verified(abstract_state, int(step), data_iter)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        failed: list[CheckpointCorrupt] = []
        for s in reversed(steps):
            try:
                out = self._restore_verified(abstract_state, s, data_iter)
            except CheckpointCorrupt as e:
                log.warning("%s; trying the previous step", e)
                failed.append(e)
                continue
            if failed:
                log.warning("fell back to checkpoint step %d: newer step(s) %s failed verification%s", s,
                            [e.step for e in failed],
                            "" if self.read_only else f" and were moved to {self.directory.parent / REJECTED_DIR}")
                self._reject([e.step for e in failed])
            return out
        raise CheckpointCorrupt(failed[-1].step, "all", str(self.directory),
                                f"no step verifies ({'; '.join(str(e) for e in failed)}); move the checkpoints "
                                "away to start fresh")

    def _reject(self, steps: Sequence[int]) -> None:
        """Move bad steps out of the manager's directory (kept for inspection, never counted)."""
        if self.read_only or not steps:
            return
        self.manager.wait_until_finished()
        dest = self.directory.parent / REJECTED_DIR
        if jax.process_index() == 0:
            dest.mkdir(parents=True, exist_ok=True)
            for s in steps:
                src = self.directory / str(s)
                if src.exists():
                    target = dest / f"{s}-{int(time.time())}"
                    src.rename(target)
                    log.warning("moved checkpoint step %d to %s", s, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("sgt_reject_checkpoints")
        self.unconfirmed.difference_update(steps)
        self.manager.reload()

    def reject_unconfirmed(self) -> list[int]:
        """After a divergence: move the steps no finite update ever followed; -> their steps."""
        self.manager.wait_until_finished()
        bad = sorted(s for s in self.unconfirmed if s in set(self.all_steps()))
        self._reject(bad)
        return bad

    def _check_shapes(self, step: int, abstract_tree: dict, meta: dict) -> None:
        """Raise CheckpointMismatch naming param paths and config fields when the model changed."""
        try:
            saved = self.manager.item_metadata(step)[STATE]
        except Exception as e:  # noqa: BLE001 - unreadable metadata is corruption, handled by the caller
            raise CheckpointCorrupt(step, STATE, self._json_culprit(step, STATE), _first_line(e)) from e
        saved_tree = getattr(saved, "tree", saved)
        if not isinstance(saved_tree, dict):
            return
        want = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]}
        have = {path_str(p): tuple(getattr(x, "shape", ()) or ())
                for p, x in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
        diffs = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in want if k in have and have[k] != want[k]]
        diffs += [f"{k}: not in the checkpoint" for k in want if k not in have]
        diffs += [f"{k}: in the checkpoint only" for k in have if k not in want]
        if not diffs:
            return
        # Optimizer moments and EMA mirror the params: name the params when they differ.
        params_first = [d for d in diffs if d.startswith("params/")] or diffs
        n_all = len(diffs)
        diffs = params_first
        fields = _config_diff(meta.get("config"), self._current_config)
        raise CheckpointMismatch(
            f"checkpoint {self.directory / str(step)} was written for a different model: "
            f"{'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''} ({n_all} state path(s) differ in all)"
            + (f"; config fields that differ from the run's: {', '.join(fields[:12])}" if fields else "")
            + ". Use a new --workdir, or start from it with init_from.path.")

    _current_config: Any = None

    def set_run_config(self, cfg) -> None:
        """The running config, to name differing fields when a checkpoint does not fit."""
        self._current_config = cfg

    def _json_culprit(self, step: int, item: str) -> str:
        bad = _bad_json_files(self.directory / str(step))
        return ", ".join(bad) if bad else str(self.directory / str(step) / item)

    def _restore_verified(self, abstract_state: TrainState, step: int, data_iter=None
                          ) -> tuple[TrainState, dict, int]:
        step_dir = self.directory / str(step)
        abstract_tree = abstract_state.to_tree()

        def read_meta():
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
            except Exception as e:  # noqa: BLE001 - any read error makes the step unusable
                raise CheckpointCorrupt(step, META, self._json_culprit(step, META), _first_line(e)) from e
            return dict(meta or {})

        def read_state():
            try:
                return self.manager.restore(step, args=ocp.args.Composite(
                    **{STATE: ocp.args.StandardRestore(abstract_tree)}))[STATE]
            except Exception as e:  # noqa: BLE001
                raise CheckpointCorrupt(step, STATE, self._json_culprit(step, STATE), _first_line(e)) from e

        meta = _on_all_processes(step, META, read_meta)
        self._check_shapes(step, abstract_tree, meta)
        out = _on_all_processes(step, STATE, read_state)  # before the checksum, which is a collective
        record = meta.get(INTEGRITY)
        if not self.verify:
            pass
        elif record is None:
            log.warning("checkpoint step %d has no checksums (written before verification existed): "
                        "restored unverified", step)
        else:
            got = state_integrity(out)
            want = record.get("checksums", {})
            bad = [p for p, v in got["checksums"].items() if p in want and int(want[p]) != v]
            if bad:
                raise CheckpointCorrupt(step, STATE, str(step_dir / STATE),
                                        f"checksum mismatch in {len(bad)} array(s): {', '.join(bad[:5])}")
            nonfinite = [k for k, ok in got["finite"].items() if not ok]
            nonfinite += [k for k, ok in record.get("finite", {}).items() if not ok and k not in nonfinite]
            if nonfinite:
                raise CheckpointCorrupt(step, STATE, str(step_dir / STATE),
                                        f"non-finite values in {', '.join(nonfinite)}")
        if data_iter is not None:
            _on_all_processes(step, DATA, lambda: self._restore_data(step, data_iter))
        # A verified step stays confirmed: if the resumed run diverges at once, its new settings (lr,
        # data) are the likelier cause, and the step must remain to resume from.
        return TrainState.from_tree(out), meta, int(step)

    def _restore_data(self, step: int, data_iter) -> None:
        _, _, restore_cls = _grain_handler()
        try:
            self.manager.restore(step, args=ocp.args.Composite(**{DATA: restore_cls(data_iter)}))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointCorrupt(step, DATA, self._json_culprit(step, DATA), _first_line(e)) from e
        except (ValueError, FileNotFoundError, KeyError) as e:  # no state for this process count
            log.warning("checkpoint %s has no data-iterator state for %d process(es) (%s); the data stream "
                        "restarts from its beginning", self.directory / str(step), jax.process_count(),
                        _first_line(e, 200))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _on_all_processes(step: int, item: str, read):
    """Run a local read; every process fails the step if any process could not read its part
    (so all fall back together and the next collective does not hang)."""
    err, out = None, None
    try:
        out = read()
    except CheckpointCorrupt as e:
        err = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = np.asarray(multihost_utils.process_allgather(np.int32(err is not None)))
        if err is None and failed.any():
            raise CheckpointCorrupt(step, item, f"process(es) {np.flatnonzero(failed).tolist()}",
                                    "could not be read there (see that process's log)")
    if err is not None:
        raise err
    return out


def _config_diff(saved_json: str | None, cfg) -> list[str]:
    """'field: saved -> now' for model.* fields that differ between a checkpoint and the run."""
    if not saved_json or cfg is None:
        return []
    try:
        saved = json.loads(saved_json) if isinstance(saved_json, str) else dict(saved_json)
        now = json.loads(cfg.to_json_best_effort())
    except (ValueError, TypeError, AttributeError):
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    a, b = flat(saved.get("model", {}), "model."), flat(now.get("model", {}), "model.")
    return [f"{k}={a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------------------------
# preemption
# ---------------------------------------------------------------------------------------------
class PreemptionWatcher:
    """Answers "should we save and stop now?" each step.

    Multi-process (jax.distributed initialized): Orbax's `reached_preemption`, where jax's
    coordination service makes every process agree on the same step. Single process (no
    coordination service to ask): a SIGTERM handler sets a flag.
    """

    def __init__(self, manager: ocp.CheckpointManager | None = None):
        self._flag = threading.Event()
        self._previous = None
        self._manager = manager
        self._multi = manager is not None and jax.distributed.is_initialized()
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")
        self._flag.set()

    def reached(self, step: int) -> bool:
        if self._multi:
            return bool(self._manager.reached_preemption(int(step)))
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---------------------------------------------------------------------------------------------
# init_from: load parameters written by another stage
# ---------------------------------------------------------------------------------------------
class RunDirError(ValueError):
    """A --workdir that holds no run (a user error: tools exit 2)."""


def check_run_dir(workdir: str, step: int = -1, *, flag: str = "--workdir") -> epath.Path:
    """The step directory a tool should read from `workdir`, or a RunDirError naming the flag:
    the directory is missing, holds no checkpoint (no run there), or lacks the asked step."""
    p = epath.Path(workdir).absolute()
    if not p.exists():
        raise RunDirError(f"{flag}={workdir!r}: directory does not exist")
    if not p.is_dir():
        raise RunDirError(f"{flag}={workdir!r}: not a directory")
    root = p / "checkpoints"
    steps = sorted(int(d.name) for d in root.iterdir() if d.is_dir() and d.name.isdigit()
                   and (d / STATE).exists()) if root.exists() else []
    if not steps:
        raise RunDirError(f"{flag}={workdir!r}: there is no run there (no checkpoints/<step>/{STATE} under it); "
                          f"train one with tools/train.py --workdir={workdir}")
    if step >= 0 and step not in steps:
        raise RunDirError(f"--step={step}: not in {workdir!r}; available steps: {steps}")
    return root / str(steps[-1] if step < 0 else step)


def resolve_step_dir(path: str, step: int = -1) -> epath.Path:
    """A workdir, a checkpoints root or a step directory -> the step directory to read."""
    p = epath.Path(path).absolute()  # orbax metadata reads come back empty for relative paths
    if (p / STATE).exists():
        return p
    root = p / "checkpoints" if (p / "checkpoints").exists() else p
    if not root.exists():
        raise FileNotFoundError(f"config field 'init_from.path' = {path!r}: directory does not exist")
    steps = sorted(int(d.name) for d in root.iterdir() if d.is_dir() and d.name.isdigit() and (d / STATE).exists())
    if not steps:
        raise FileNotFoundError(f"config field 'init_from.path' = {path!r}: no checkpoint found "
                                f"(looked for <step>/{STATE} under {root})")
    if step < 0:
        return root / str(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"config field 'init_from.step' = {step}: not in {path!r}; available: {steps}")
    return root / str(step)


def parse_mapping(mapping: str) -> list[tuple[str, str]]:
    """"src->dst,src2->dst2" -> [(src, dst), ...]; "" -> identity on every shared path."""
    out = []
    for part in mapping.split(","):
        part = part.strip()
        if not part:
            continue
        if "->" not in part:
            raise ValueError(f"config field 'init_from.mapping' entry {part!r} must look like 'src_prefix->dst_prefix'")
        src, dst = (s.strip().strip("/") for s in part.split("->", 1))
        out.append((src, dst))
    return out


def _flat(tree: PyTree) -> dict[str, Any]:
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _join(prefix: str, rest: str) -> str:
    return "/".join(s for s in (prefix, rest) if s)


def state_metadata(step_dir: epath.Path) -> dict:
    """The array metadata tree of a step's state item (shapes and dtypes; nothing is read)."""
    meta_tree = ocp.PyTreeCheckpointer().metadata(step_dir / STATE)
    meta_tree = getattr(meta_tree, "item_metadata", meta_tree)
    return getattr(meta_tree, "tree", meta_tree)


def params_key(meta_tree, use_ema: bool = True) -> str:
    """Which params a load reads: "ema_params" when the checkpoint has them and `use_ema`, else "params"."""
    return "ema_params" if use_ema and "ema_params" in meta_tree else "params"


def params_source(path: str, step: int = -1, use_ema: bool = True) -> str:
    """`params_key` of a run's checkpoint (e.g. to say whether an export holds EMA params)."""
    return params_key(state_metadata(resolve_step_dir(path, step)), use_ema)


def load_params(path: str, target_params: PyTree, *, mapping: str = "", step: int = -1,
                use_ema: bool = True) -> tuple[PyTree, list[str]]:
    """Fill `target_params` (concrete, sharded) from another run's checkpoint.

    Each destination path whose prefix matches a mapping's `dst` is read from `src` + the rest of
    the path (the source's EMA params when it has them and `use_ema`). Only the needed arrays are
    read, directly onto the destination shardings. Returns (params, loaded destination paths).
    """
    step_dir = resolve_step_dir(path, step)
    ckptr = ocp.PyTreeCheckpointer()
    meta_tree = state_metadata(step_dir)
    source_key = params_key(meta_tree, use_ema)
    src_flat = _flat(meta_tree[source_key])
    rules = parse_mapping(mapping) or [("", "")]
    dst_flat = _flat(target_params)

    plan: dict[str, str] = {}  # dst path -> src path
    for dst_path in dst_flat:
        for src_prefix, dst_prefix in rules:
            if dst_prefix and not (dst_path == dst_prefix or dst_path.startswith(dst_prefix + "/")):
                continue
            rest = dst_path[len(dst_prefix):].lstrip("/")
            src_path = _join(src_prefix, rest)
            if src_path in src_flat:
                plan[dst_path] = src_path
                break
    if not plan:
        raise ValueError(f"init_from {path!r} (mapping {mapping!r}): no destination parameter matched a source "
                         f"parameter; source has e.g. {sorted(src_flat)[:5]}, destination e.g. {sorted(dst_flat)[:5]}")
    for dst_path, src_path in plan.items():
        s_shape, d_shape = tuple(src_flat[src_path].shape), tuple(dst_flat[dst_path].shape)
        if s_shape != d_shape:
            raise ValueError(f"init_from: source {src_path} has shape {s_shape} but destination {dst_path} "
                             f"needs {d_shape}")

    # Nested partial target {source_key: {...src path...}} with destination shardings.
    item: dict = {}
    restore_args: dict = {}
    for dst_path, src_path in plan.items():
        d = dst_flat[dst_path]
        node, rnode = item.setdefault(source_key, {}), restore_args.setdefault(source_key, {})
        keys = src_path.split("/")
        for k in keys[:-1]:
            node, rnode = node.setdefault(k, {}), rnode.setdefault(k, {})
        node[keys[-1]] = jax.ShapeDtypeStruct(d.shape, d.dtype, sharding=d.sharding)
        rnode[keys[-1]] = ocp.ArrayRestoreArgs(sharding=d.sharding, global_shape=d.shape, dtype=d.dtype)
    restored = ckptr.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    src_loaded = _flat(restored[source_key])
    new_flat = dict(dst_flat)
    for dst_path, src_path in plan.items():
        new_flat[dst_path] = src_loaded[src_path]
    leaves = [new_flat[k] for k in dst_flat]
    treedef = jax.tree.structure(target_params)
    log.info("init_from %s: loaded %d/%d parameter arrays (%s)", step_dir, len(plan), len(dst_flat), source_key)
    return jax.tree.unflatten(treedef, leaves), sorted(plan)


def read_metadata(path: str, step: int = -1) -> dict:
    """The JSON metadata (config, step, versions) of a run's checkpoint."""
    step_dir = resolve_step_dir(path, step)
    f = step_dir / META / "metadata"
    if f.exists():
        try:
            return json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointCorrupt(int(step_dir.name) if step_dir.name.isdigit() else -1, META, str(f),
                                    _first_line(e)) from e
    for cand in (step_dir / META).iterdir():
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except ValueError:
                continue
    return {}

