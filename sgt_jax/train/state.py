"""The train state pytree and its sharded creation.

Params and optimizer state are created directly with their target shardings
(`jax.eval_shape` -> shardings -> `jax.jit(init, out_shardings=...)`), so no host ever holds the
whole model.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sgt_jax.train import optim, sharding

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""
    step: jax.Array  # int32: train steps taken (skipped ones included)
    params: PyTree  # fp32, unboxed
    model_state: PyTree  # non-trainable collections ({} if none)
    opt_state: PyTree
    ema_params: PyTree | None  # None when optim.ema_decay == 0
    consecutive_skips: jax.Array  # int32: non-finite steps in a row
    total_skips: jax.Array  # int32

    def to_tree(self) -> dict:
        """Plain dict for Orbax (None EMA dropped)."""
        out = {f: getattr(self, f) for f in ("step", "params", "model_state", "opt_state",
                                             "consecutive_skips", "total_skips")}
        if self.ema_params is not None:
            out["ema_params"] = self.ema_params
        return out

    @classmethod
    def from_tree(cls, tree: dict) -> "TrainState":
        return cls(step=tree["step"], params=tree["params"], model_state=tree["model_state"],
                   opt_state=tree["opt_state"], ema_params=tree.get("ema_params"),
                   consecutive_skips=tree["consecutive_skips"], total_skips=tree["total_skips"])

    def eval_params(self) -> PyTree:
        """The params to evaluate/export: EMA when enabled."""
        return self.params if self.ema_params is None else self.ema_params


class StateSetup(NamedTuple):
    """What `setup_state` derives once per run (all static except `state`)."""
    state: TrainState | None
    abstract: TrainState  # ShapeDtypeStructs carrying shardings (restore target)
    shardings: TrainState  # NamedSharding per leaf
    tx: optax.GradientTransformation
    labels: PyTree  # "train"/"frozen" per param leaf
    example_spec: PyTree  # ShapeDtypeStructs of one global batch


def batch_spec(example_batch: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(x.dtype)), example_batch)


def _zeros(spec: PyTree) -> PyTree:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)


def setup_state(stage, cfg, mesh, rng, example_batch: PyTree, *, materialize: bool = True) -> StateSetup:
    """Build tx, shardings and (if `materialize`) the freshly initialised, already sharded state.

    `example_batch` (arrays or ShapeDtypeStructs, global batch) only fixes shapes: init sees zeros.
    """
    rules = sharding.axis_rules(cfg)
    spec = batch_spec(example_batch)

    def init_boxed(key):
        return stage.init(key, _zeros(spec))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_boxed, rng)
    sharding.check_ruled(sharding.logical_names(boxed), rules)
    params_abs = nn.unbox(boxed[0])
    tx, labels = optim.make_optimizer(cfg, params_abs, getattr(stage, "frozen", ()),
                                      getattr(stage, "no_decay", ()))
    use_ema = cfg.optim.ema_decay > 0

    def init_state_boxed(key):
        """The state with params still boxed: optax and the EMA copy map over the boxes, so every
        moment carries its parameter's logical names."""
        params, model_state = init_boxed(key)
        params = jax.tree.map(lambda p: p.astype(jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                              params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=tx.init(params), ema_params=params if use_ema else None,
                          consecutive_skips=jnp.zeros((), jnp.int32), total_skips=jnp.zeros((), jnp.int32))

    def init_state(key):
        return nn.unbox(init_state_boxed(key))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_boxed = jax.eval_shape(init_state_boxed, rng)
    # Unboxed leaves (step, counters, optax counts) get P(): replicated.
    shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
    abstract = sharding.abstract_with_shardings(nn.unbox(abstract_boxed), shardings)
    state = None
    if materialize:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state = jax.jit(init_state, out_shardings=shardings)(rng)
    return StateSetup(state, abstract, shardings, tx, labels, spec)
