"""Logical-axis sharding: map parameter / optimizer-state / batch trees onto the mesh.

Parameters carry logical names (flax `LogicallyPartitioned` boxes); `cfg.mesh.axis_rules` maps
those names to mesh axes. Optimizer state and EMA copies are created from the boxed params inside
`jax.eval_shape` (train/state.py), so their leaves carry the same boxes and get their shardings from
`nn.get_partition_spec` of the whole abstract state (MaxText's `get_abstract_state`), not by
matching paths.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any


def axis_rules(cfg) -> tuple[tuple[str, Any], ...]:
    """`cfg.mesh.axis_rules` as hashable tuples (ConfigDict may hold lists)."""
    out = []
    for name, target in cfg.mesh.axis_rules:
        if isinstance(target, list):
            target = tuple(target)
        out.append((name, target))
    return tuple(out)


def _is_box(x) -> bool:
    """A leaf that carries logical axis names (flax's boxed parameter types)."""
    return isinstance(x, (nn.spmd.LogicallyPartitioned, nn.Partitioned))


def logical_shardings(boxed_tree: PyTree, mesh: Mesh, rules) -> PyTree:
    """NamedSharding per leaf of an (abstract) boxed tree; unboxed leaves are replicated.

    Returns a tree with the structure of `nn.unbox(boxed_tree)`.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def logical_names(boxed_tree: PyTree) -> set[str]:
    """Every logical axis name on the boxed leaves of a tree (abstract params, abstract train state)."""
    names: set[str] = set()
    for leaf in jax.tree.leaves(boxed_tree, is_leaf=_is_box):
        if _is_box(leaf):
            names.update(n for n in leaf.names if isinstance(n, str))
    return names


def unruled(names, rules) -> list[str]:
    """The logical names in `names` that no rule maps: flax would silently replicate those dims."""
    ruled = {name for name, _ in rules}
    return sorted(set(n for n in names if isinstance(n, str)) - ruled)


def check_ruled(names, rules, what: str = "parameters") -> None:
    """Fail naming the unruled logical axes (and where to add them) instead of replicating them."""
    missing = unruled(names, rules)
    if missing:
        raise ValueError(f"logical axis names {missing} used by {what} have no rule in config field "
                         f"'mesh.axis_rules' ({[n for n, _ in rules]}); add (name, mesh axis or None) rules")


# The KV cache's logical layout: head-major [batch, kv_heads, length, head_dim], with a leading
# `layers` axis (one stacked array per k / v; `models.llm.init_cache`).
KV_CACHE_NAMES = ("batch", "kv_heads", "length", "kv")


def kv_cache_shardings(cache: PyTree, mesh: Mesh, rules) -> PyTree:
    """NamedSharding per KV-cache leaf: k/v heads over `tensor` (as the K/V kernels), batch over the
    batch axes; the per-row `length` vector over the batch axes."""
    def one(leaf):
        nd = len(leaf.shape)
        if nd == 1:
            names = ("batch",)
        elif nd in (4, 5):
            names = (("layers",) if nd == 5 else ()) + KV_CACHE_NAMES
        else:
            raise ValueError(f"KV-cache leaf of shape {tuple(leaf.shape)}: expected [B], [B, H, S, D] or "
                             "[layers, B, H, S, D]")
        return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))
    return jax.tree.map(one, cache)


def batch_axes(rules) -> Any:
    """Mesh axes the logical 'batch' axis maps to (default: data and fsdp)."""
    for name, target in rules:
        if name == "batch":
            return target
    return ("data", "fsdp")


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim sharded over the batch axes; other dims replicated."""
    return NamedSharding(mesh, P(batch_axes(rules), *([None] * (ndim - 1))))


def batch_shardings(batch: PyTree, mesh: Mesh, rules) -> PyTree:
    return jax.tree.map(lambda x: batch_sharding(mesh, rules, np.ndim(x) if not hasattr(x, "shape")
                                                 else len(x.shape)), batch)


def host_batch_to_global(batch: PyTree, mesh: Mesh, rules) -> PyTree:
    """Per-process numpy batch (leading dim = global batch / process count) -> global jax.Arrays.

    Each process passes its own slice; jax stitches them into one array sharded over the batch axes.
    """
    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, rules, x.ndim)
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree.map(one, batch)


def check_process_batch_layout(mesh: Mesh, rules, global_batch: int) -> None:
    """Each process must own rows [i*B/n, (i+1)*B/n) of the global batch, which is what the data
    pipelines feed. False when the batch axes do not split evenly over processes (e.g. a tensor axis
    spanning hosts, where processes would need identical rows): fail early with the reason."""
    n, pid = jax.process_count(), jax.process_index()
    if n == 1:
        return
    if global_batch % n:
        raise ValueError(f"config field 'train.batch_size' = {global_batch} must be divisible by the "
                         f"process count {n}")
    per = global_batch // n
    rows: set[int] = set()
    for dev, idx in batch_sharding(mesh, rules).devices_indices_map((global_batch,)).items():
        if dev.process_index == pid:
            rows.update(range(*idx[0].indices(global_batch)))
    if rows != set(range(pid * per, (pid + 1) * per)):
        raise ValueError(
            f"mesh {dict(mesh.shape)}: process {pid} holds batch rows {min(rows)}..{max(rows)} "
            f"({len(rows)} rows) but the data pipeline gives it rows {pid * per}..{(pid + 1) * per - 1}; put "
            f"the 'data'/'fsdp' axes across hosts and 'tensor' within a host")


def abstract_with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying target shardings (restore targets, AOT compile inputs)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(shardings: PyTree, abstract: PyTree, limit: int = 20) -> Sequence[str]:
    """Human-readable 'path shape spec' lines for logging what got sharded how."""
    lines = []
    for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(shardings), strict=True):
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {getattr(s, 'spec', s)}")
    return lines[:limit]
