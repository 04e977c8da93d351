"""Orbax checkpoints: train state + grain iterator state + JSON metadata in one step directory.

Layout: <workdir>/checkpoints/<step>/{state, data, metadata}. Saves are async (the device->host copy
is blocking, the write is not), old steps are pruned by preservation policies (latest N, plus the
best N by an eval metric), SIGTERM triggers a save before exit, and restore takes an abstract target
so a checkpoint written on one mesh loads onto any other.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm

from sgt_jax.train.state import TrainState

PyTree = Any
log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "metadata"


def _grain_args():
    import grain.checkpoint as gc  # grain registers its Orbax handler on import
    return gc.CheckpointSave, gc.CheckpointRestore


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
# simulated CPU devices. Only arrays whose per-replica slice is at least this large use it.
_MIN_REPLICA_SLICE_BYTES = 1 << 20
_handler_configured = False


def _configure_array_handler() -> None:
    global _handler_configured
    if _handler_configured:
        return
    _handler_configured = True
    try:
        from orbax.checkpoint._src.metadata import array_metadata_store
        handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                                 min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    except (ImportError, AttributeError, TypeError) as e:  # other orbax versions: keep their default
        log.info("orbax ArrayHandler left at its default (%s)", e)


class Checkpointer:
    """Thin policy layer over `ocp.CheckpointManager` for the training loop."""

    def __init__(self, directory: str, *, keep: int = 3, best_metric: str = "", best_mode: str = "max",
                 async_save: bool = True, read_only: bool = False):
        self.directory = epath.Path(directory).absolute()  # orbax needs absolute paths
        self.best_metric, self.best_mode = best_metric, best_mode
        policies = [cm.LatestN(n=keep)]
        if best_metric:
            # BestN sorts ascending and keeps the tail: reverse for "min".
            policies.append(cm.BestN(get_metric_fn=lambda m: float(m[best_metric]), reverse=(best_mode == "min"),
                                     n=keep, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies) if len(policies) > 1 else policies[0],
            # best_fn makes the manager write per-step metrics (which BestN ranks) and answer best_step().
            best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        _grain_args()
        _configure_array_handler()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, META))

    # ---- queries ----
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        """Kept step with the best `best_metric` (latest step when no metric is tracked)."""
        return self.manager.best_step()

    # ---- save / restore ----
    def save(self, step: int, state: TrainState, data_iter=None, *, metadata: dict | None = None,
             metrics: dict | None = None, force: bool = False) -> bool:
        """Queue an async save of everything at `step`; returns whether a save was started."""
        save_cls, _ = _grain_args()
        meta = {"step": int(step), "time": time.time(), "versions": versions(),
                "process_count": jax.process_count(), "device_count": jax.device_count()}
        meta.update(metadata or {})
        items = {STATE: ocp.args.StandardSave(state.to_tree()), META: ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items[DATA] = save_cls(data_iter)
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
            if self.best_metric and self.best_metric not in metrics:
                metrics = None
        return self.manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None, data_iter=None
                ) -> tuple[TrainState, dict, int]:
        """Restore onto the shardings carried by `abstract_state` (any mesh); `data_iter` is
        restored in place when the checkpoint has this process count's iterator state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        _, restore_cls = _grain_args()
        items = {STATE: ocp.args.StandardRestore(abstract_state.to_tree()), META: ocp.args.JsonRestore()}
        step_dir = self.directory / str(step)
        if data_iter is not None:
            data_file = step_dir / DATA / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if data_file.exists():
                items[DATA] = restore_cls(data_iter)
            else:
                log.warning("checkpoint %s has no data-iterator state for %d processes; the data stream "
                            "restarts from its beginning", step_dir, jax.process_count())
        out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        return TrainState.from_tree(out[STATE]), dict(out[META] or {}), int(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------
# preemption
# ---------------------------------------------------------------------------------------------
class PreemptionWatcher:
    """Answers "should we save and stop now?" each step.

    Single process: a SIGTERM handler sets a flag. Multi-process: jax's coordination service owns
    SIGTERM and `reached_preemption_sync_point` makes every process agree on the same step.
    """

    AGREE_EVERY = 10

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi:
            self._install()

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")
        self._flag.set()

    def reached(self, step: int) -> bool:
        if self._multi:
            try:
                from jax.experimental import multihost_utils
                return bool(multihost_utils.reached_preemption_sync_point(int(step)))
            except Exception as e:  # noqa: BLE001 - no preemption service in this runtime
                log.warning("no multi-host preemption service (%s); using local SIGTERM handlers agreed "
                            "every %d steps", e, self.AGREE_EVERY)
                self._multi = False
                self._install()
        if jax.process_count() > 1:
            # Processes must stop at the same step or the next collective hangs: agree on a schedule.
            if step % self.AGREE_EVERY:
                return False
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.asarray(self._flag.is_set(), np.int32))
            return bool(np.any(flags))
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---------------------------------------------------------------------------------------------
# init_from: load parameters written by another stage
# ---------------------------------------------------------------------------------------------
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
    from sgt_jax.train.optim import path_str
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _join(prefix: str, rest: str) -> str:
    return "/".join(s for s in (prefix, rest) if s)


def load_params(path: str, target_params: PyTree, *, mapping: str = "", step: int = -1,
                use_ema: bool = True) -> tuple[PyTree, list[str]]:
    """Fill `target_params` (concrete, sharded) from another run's checkpoint.

    Each destination path whose prefix matches a mapping's `dst` is read from `src` + the rest of
    the path (the source's EMA params when it has them and `use_ema`). Only the needed arrays are
    read, directly onto the destination shardings. Returns (params, loaded destination paths).
    """
    step_dir = resolve_step_dir(path, step)
    ckptr = ocp.PyTreeCheckpointer()
    meta_tree = ckptr.metadata(step_dir / STATE)
    meta_tree = getattr(meta_tree, "item_metadata", meta_tree)
    meta_tree = getattr(meta_tree, "tree", meta_tree)
    source_key = "ema_params" if use_ema and "ema_params" in meta_tree else "params"
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
        return json.loads(f.read_text())
    for cand in (step_dir / META).iterdir():
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except ValueError:
                continue
    return {}

