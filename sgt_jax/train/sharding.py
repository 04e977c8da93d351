"""Logical-axis sharding: map parameter / optimizer-state / batch trees onto the mesh.

Parameters carry logical names (flax `LogicallyPartitioned` boxes); `cfg.mesh.axis_rules` maps
those names to mesh axes. Optimizer state and EMA copies mirror the parameter tree, so their leaves
inherit the sharding of the parameter with the same path (matched on the trailing dict keys).
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


def logical_shardings(boxed_tree: PyTree, mesh: Mesh, rules) -> PyTree:
    """NamedSharding per leaf of an (abstract) boxed tree; unboxed leaves are replicated.

    Returns a tree with the structure of `nn.unbox(boxed_tree)`.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def _trailing_keys(path) -> tuple[str, ...]:
    keys = []
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            keys.append(str(entry.key))
        else:
            break
    return tuple(reversed(keys))


def mirror_shardings(tree: PyTree, params_abstract: PyTree, params_shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for a tree whose sub-trees mirror the params (optax state, EMA params).

    A leaf whose trailing dict-key path equals a parameter path and whose shape matches that
    parameter gets the parameter's sharding; everything else (step counts, scalars) is replicated.
    """
    table: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
    for (path, leaf), shard in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0],
                                   jax.tree.leaves(params_shardings), strict=True):
        table[_trailing_keys(path)] = (tuple(leaf.shape), shard)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = _trailing_keys(path)
        # Try every suffix so prefixes added by optax wrappers (e.g. multi_transform's inner dict
        # keyed by group label) do not hide the match.
        for start in range(len(keys)):
            hit = table.get(keys[start:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


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
