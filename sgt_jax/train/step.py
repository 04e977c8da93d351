"""The pure train step: grads of the trainable partition (optionally accumulated over
micro-batches), the optax update with frozen leaves untouched, the stage's in-graph post-update and
EMA, and a finite check on the result that keeps the old state when anything is non-finite.
`jit_train_step` compiles it once with explicit shardings and a donated state.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sgt_jax.train import optim, sharding
from sgt_jax.train.metrics import Ratio
from sgt_jax.train.state import TrainState

PyTree = Any


def _is_ratio(x) -> bool:
    return isinstance(x, Ratio)


def _finalize(metrics: dict) -> dict:
    """Ratio(total, count) -> total / count (NaN where count is 0); other entries unchanged."""
    return {k: (jnp.where(v.count > 0, v.total / jnp.maximum(v.count, 1e-30), jnp.nan) if _is_ratio(v) else v)
            for k, v in metrics.items()}


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def split_trainable(tree: PyTree, labels: PyTree) -> tuple[list, list]:
    """(trainable leaves, frozen leaves) of a params-shaped tree, in flatten order."""
    leaves = jax.tree.leaves(tree)
    labs = jax.tree.leaves(labels)
    return ([x for x, lab in zip(leaves, labs, strict=True) if lab == optim.TRAIN],
            [x for x, lab in zip(leaves, labs, strict=True) if lab != optim.TRAIN])


def merge_trainable(train: list, frozen: list, labels: PyTree) -> PyTree:
    """Inverse of `split_trainable`."""
    it_t, it_f = iter(train), iter(frozen)
    labs = jax.tree.leaves(labels)
    return jax.tree.unflatten(jax.tree.structure(labels), [next(it_t) if lab == optim.TRAIN else next(it_f)
                                                            for lab in labs])


def make_train_step(stage, cfg, tx: optax.GradientTransformation, labels: PyTree, mesh=None
                    ) -> Callable[[TrainState, PyTree, jax.Array], tuple[TrainState, dict]]:
    """-> train_step(state, batch, rng) -> (state, metrics). Pure; metrics are fp32 scalars.

    Gradients (and the f32 accumulation buffers) exist only for trainable leaves; frozen ones are
    closed over as constants. Metrics a stage returns as `Ratio(total, count)` are summed over
    micro-batches and divided once, so they equal the token mean of the whole batch.
    """
    accum = int(cfg.optim.grad_accum_steps)
    ema_decay = float(cfg.optim.ema_decay)
    post_update = getattr(stage, "post_update", None)
    rules = sharding.axis_rules(cfg)

    def loss_of_trainable(train_leaves, frozen_leaves, model_state, batch, rng, step):
        return stage.loss_fn(merge_trainable(train_leaves, frozen_leaves, labels), model_state, batch, rng, step)

    grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)

    def grads_one(train_p, frozen_p, model_state, batch, rng, step):
        (loss, (metrics, new_ms)), grads = grad_fn(train_p, frozen_p, model_state, batch, rng, step)
        return loss, metrics, new_ms, grads

    def grads_accum(train_p, frozen_p, model_state, batch, rng, step):
        # Micro-batch a = rows i*accum + a: with the batch dim sharded in contiguous blocks, every
        # micro-batch stays spread over all data-parallel devices (no resharding).
        def split(x):
            x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
            if mesh is not None:
                x = jax.lax.with_sharding_constraint(
                    x, NamedSharding(mesh, P(None, sharding.batch_axes(rules), *([None] * (x.ndim - 2)))))
            return x
        micro = jax.tree.map(split, batch)
        rngs = jax.random.split(rng, accum)
        first = jax.tree.map(lambda x: x[0], micro)
        _, (m_shape, _) = jax.eval_shape(loss_of_trainable, train_p, frozen_p, model_state, first, rng, step)
        zeros_m = {k: (jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), v) if _is_ratio(v)
                       else jnp.zeros(v.shape, jnp.float32 if v.ndim == 0 else v.dtype))
                   for k, v in m_shape.items()}

        def add(acc, v):
            if _is_ratio(v):
                return Ratio(acc.total + v.total.astype(jnp.float32), acc.count + v.count.astype(jnp.float32))
            return (acc + v.astype(jnp.float32)) if jnp.ndim(v) == 0 else v  # non-scalars: last micro-batch

        def body(carry, xs):
            g_sum, loss_sum, m_acc, ms = carry
            mb, r = xs
            loss, metrics, ms, grads = grads_one(train_p, frozen_p, ms, mb, r, step)
            g_sum = [a + g.astype(jnp.float32) for a, g in zip(g_sum, grads, strict=True)]
            m_acc = {k: add(m_acc[k], v) for k, v in metrics.items()}
            return (g_sum, loss_sum + loss.astype(jnp.float32), m_acc, ms), None

        g0 = [jnp.zeros(p.shape, jnp.float32) for p in train_p]
        (g_sum, loss_sum, m_acc, new_ms), _ = jax.lax.scan(
            body, (g0, jnp.float32(0), zeros_m, model_state), (micro, rngs))
        metrics = {k: v if _is_ratio(v) else ((v / accum) if jnp.ndim(v) == 0 else v) for k, v in m_acc.items()}
        grads = [(g / accum).astype(p.dtype) for g, p in zip(g_sum, train_p, strict=True)]
        return loss_sum / accum, metrics, new_ms, grads

    compute = grads_one if accum == 1 else grads_accum

    def train_step(state: TrainState, batch: PyTree, rng: jax.Array) -> tuple[TrainState, dict]:
        rng_loss, rng_post = jax.random.split(rng)
        train_p, frozen_p = split_trainable(state.params, labels)
        loss, metrics, new_ms, train_grads = compute(train_p, frozen_p, state.model_state, batch, rng_loss,
                                                     state.step)
        metrics = _finalize(metrics)
        grad_norm = optax.tree.norm(train_grads)
        # Frozen leaves take their own params as stand-in gradients: multi_transform sends them to
        # set_to_zero and apply_updates ignores them, so nothing is allocated for them.
        grads = merge_trainable(train_grads, frozen_p, labels)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optim.apply_updates(state.params, updates, labels)
        model_state = new_ms
        if post_update is not None:
            params, model_state = post_update(params, model_state, metrics, rng_post, state.step)
        ema = state.ema_params
        if ema is not None:
            ema = optim.ema_update(ema, params, ema_decay, state.step)
        # Like optax.apply_if_finite, but over the whole result: a step whose loss, gradients, new
        # params, optimizer state or model state is non-finite is never applied.
        finite = (jnp.isfinite(loss) & _all_finite(train_grads) & _all_finite(split_trainable(params, labels)[0])
                  & _all_finite(opt_state) & _all_finite(model_state) & _all_finite(ema))
        candidate = state.replace(params=params, model_state=model_state, opt_state=opt_state, ema_params=ema,
                                  consecutive_skips=jnp.zeros((), jnp.int32))
        skipped = state.replace(consecutive_skips=state.consecutive_skips + 1, total_skips=state.total_skips + 1)
        new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), candidate, skipped)
        new_state = new_state.replace(step=state.step + 1)
        out = {k: v.astype(jnp.float32) for k, v in _scalars(metrics).items()}
        out.update(
            loss=loss.astype(jnp.float32),
            grad_norm=grad_norm.astype(jnp.float32),
            # The lr of the last applied update, as optax.inject_hyperparams records it.
            lr=optim.current_lr(new_state.opt_state),
            skipped=(~finite).astype(jnp.float32),
            consecutive_skips=new_state.consecutive_skips.astype(jnp.float32),
            total_skips=new_state.total_skips.astype(jnp.float32),
        )
        return new_state, out

    return train_step


def jit_train_step(train_step, state_shardings: TrainState, batch_shardings: PyTree, mesh):
    """jax.jit with explicit in/out shardings; the state argument is donated (updated in place).
    `.trace_count()` on the result says how many times it was traced (= compiled, for one jit)."""
    traces: list[int] = []

    def counted(state, batch, rng):
        traces.append(1)
        return train_step(state, batch, rng)

    repl = NamedSharding(mesh, P())
    jitted = jax.jit(counted, in_shardings=(state_shardings, batch_shardings, repl),
                     out_shardings=(state_shardings, repl), donate_argnums=(0,))
    jitted.trace_count = lambda: len(traces)
    return jitted
