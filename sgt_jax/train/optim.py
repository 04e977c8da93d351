"""optax optimizer from config: AdamW + warmup/schedule + clipping + per-group freezing.

Freezing goes through `optax.multi_transform` (frozen group -> `set_to_zero`, so no moments are kept
for it) and the train step additionally never writes frozen leaves (`apply_updates`), which keeps
them bitwise identical (p + 0.0 would turn -0.0 into +0.0).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any
TRAIN, FROZEN = "train", "frozen"
# Leaves never weight-decayed besides 1-d ones: norms, biases, scales (matched on the path).
_NO_DECAY = re.compile(r"(^|/)(bias|scale|[^/]*norm[^/]*|ln_?[^/]*)(/|$)", re.IGNORECASE)


def path_str(path) -> str:
    """'/'-joined dict keys of a tree path (the parameter path used by freeze regexes)."""
    parts = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        parts.append(str(key))
    return "/".join(parts)


def freeze_patterns(cfg, stage_frozen: Sequence[str] = ()) -> tuple[str, ...]:
    extra = tuple(p.strip() for p in cfg.optim.freeze.split(",") if p.strip())
    return tuple(stage_frozen) + extra


def param_labels(params: PyTree, patterns: Sequence[str]) -> PyTree:
    """TRAIN / FROZEN per leaf: FROZEN when any regex `re.search`es the parameter path."""
    regs = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: FROZEN if any(r.search(path_str(path)) for r in regs) else TRAIN, params)


def decay_mask(params: PyTree, extra_no_decay: Sequence[str] = ()) -> PyTree:
    """True where weight decay applies: >= 2-d leaves that are not norms/biases/scales."""
    regs = [re.compile(p) for p in extra_no_decay]

    def one(path, leaf):
        s = path_str(path)
        return bool(len(leaf.shape) >= 2 and not _NO_DECAY.search(s) and not any(r.search(s) for r in regs))
    return jax.tree_util.tree_map_with_path(one, params)


def make_schedule(cfg) -> optax.Schedule:
    """Linear warmup from 0 to lr, then constant or cosine down to lr * end_lr_fraction."""
    o = cfg.optim
    warmup = max(int(o.warmup_steps), 0)
    if o.schedule == "constant":
        main = optax.constant_schedule(o.lr)
    else:  # "cosine" (config.check_fields allows nothing else)
        main = optax.cosine_decay_schedule(o.lr, max(int(cfg.train.steps) - warmup, 1), alpha=o.end_lr_fraction)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), main], [warmup])


def make_optimizer(cfg, params: PyTree, frozen: Sequence[str] = (), no_decay: Sequence[str] = ()
                   ) -> tuple[optax.GradientTransformation, PyTree]:
    """-> (tx, labels). `params` may be abstract (only paths and shapes are read).

    Clipping sees only trainable gradients, so frozen parameters do not shrink the global norm.
    """
    o = cfg.optim
    labels = param_labels(params, freeze_patterns(cfg, frozen))
    parts = []
    if o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    # inject_hyperparams keeps the lr of each update in the optimizer state (read by `current_lr`).
    parts.append(optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=make_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        mask=decay_mask(params, no_decay)))
    trainable = optax.chain(*parts)
    tx = optax.multi_transform({TRAIN: trainable, FROZEN: optax.set_to_zero()}, labels)
    return tx, labels


def current_lr(opt_state: PyTree) -> jax.Array:
    """The learning rate of the last update (the first one's before any), as float32."""
    found = [h["learning_rate"] for h in _hyperparams(opt_state)]
    return jnp.asarray(found[0] if found else 0.0, jnp.float32)


_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _hyperparams(tree: PyTree) -> list[dict]:
    states = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, _INJECT_STATES))
    return [s.hyperparams for s in states if isinstance(s, _INJECT_STATES)]


def apply_updates(params: PyTree, updates: PyTree, labels: PyTree) -> PyTree:
    """params + updates on trainable leaves; frozen leaves are returned untouched (bitwise)."""
    return jax.tree.map(lambda p, u, lab: p if lab == FROZEN else (p + u.astype(p.dtype)).astype(p.dtype),
                        params, updates, labels)


def ema_update(ema: PyTree, params: PyTree, decay: float, step) -> PyTree:
    """EMA of params with the usual warm start min(decay, (1+t)/(10+t)) so early EMA tracks params."""
    t = jnp.asarray(step, jnp.float32)
    d = jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


def trainable_count(params: PyTree, labels: PyTree) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    sizes = jax.tree.map(lambda p: int(jnp.size(p)) if not hasattr(p, "size") else int(p.size), params)
    total = sum(jax.tree.leaves(sizes))
    frozen = sum(s for s, lab in zip(jax.tree.leaves(sizes), jax.tree.leaves(labels), strict=True) if lab == FROZEN)
    return total - frozen, total
