"""The pure train step: grads (optionally accumulated over micro-batches), a finite check that
skips bad updates, the optax update with frozen leaves untouched, the stage's in-graph post-update,
and EMA. `jit_train_step` compiles it once with explicit shardings and a donated state.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sgt_jax.train import optim, sharding
from sgt_jax.train.state import TrainState

PyTree = Any


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(stage, cfg, tx: optax.GradientTransformation, labels: PyTree, mesh=None
                    ) -> Callable[[TrainState, PyTree, jax.Array], tuple[TrainState, dict]]:
    """-> train_step(state, batch, rng) -> (state, metrics). Pure; metrics are fp32 scalars."""
    accum = int(cfg.optim.grad_accum_steps)
    ema_decay = float(cfg.optim.ema_decay)
    schedule = optim.make_schedule(cfg)
    post_update = getattr(stage, "post_update", None)
    rules = sharding.axis_rules(cfg)
    grad_fn = jax.value_and_grad(stage.loss_fn, has_aux=True)

    def trainable(tree):
        return [x for x, lab in zip(jax.tree.leaves(tree), jax.tree.leaves(labels), strict=True) if lab == optim.TRAIN]

    def grads_one(params, model_state, batch, rng, step):
        (loss, (metrics, new_ms)), grads = grad_fn(params, model_state, batch, rng, step)
        return loss, metrics, new_ms, grads

    def grads_accum(params, model_state, batch, rng, step):
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
        _, (m_shape, _) = jax.eval_shape(stage.loss_fn, params, model_state, first, rng, step)
        zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32 if s.ndim == 0 else s.dtype), m_shape)

        def body(carry, xs):
            g_sum, loss_sum, m_acc, ms = carry
            mb, r = xs
            loss, metrics, ms, grads = grads_one(params, ms, mb, r, step)
            g_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_sum, grads)
            m_acc = {k: (m_acc[k] + v.astype(jnp.float32)) if jnp.ndim(v) == 0 else v for k, v in metrics.items()}
            return (g_sum, loss_sum + loss.astype(jnp.float32), m_acc, ms), None

        g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (g_sum, loss_sum, m_acc, new_ms), _ = jax.lax.scan(
            body, (g0, jnp.float32(0), zeros_m, model_state), (micro, rngs))
        metrics = {k: (v / accum) if jnp.ndim(v) == 0 else v for k, v in m_acc.items()}
        grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), g_sum, params)
        return loss_sum / accum, metrics, new_ms, grads

    compute = grads_one if accum == 1 else grads_accum

    def train_step(state: TrainState, batch: PyTree, rng: jax.Array) -> tuple[TrainState, dict]:
        rng_loss, rng_post = jax.random.split(rng)
        loss, metrics, new_ms, grads = compute(state.params, state.model_state, batch, rng_loss, state.step)
        train_grads = trainable(grads)
        finite = jnp.isfinite(loss) & _all_finite(train_grads) & _all_finite(new_ms)
        grad_norm = optax.tree.norm(train_grads)

        def apply(st: TrainState) -> TrainState:
            updates, opt_state = tx.update(grads, st.opt_state, st.params)
            params = optim.apply_updates(st.params, updates, labels)
            model_state = new_ms
            if post_update is not None:
                params, model_state = post_update(params, model_state, metrics, rng_post, st.step)
            ema = st.ema_params
            if ema is not None:
                ema = optim.ema_update(ema, params, ema_decay, st.step)
            return st.replace(params=params, model_state=model_state, opt_state=opt_state, ema_params=ema,
                              consecutive_skips=jnp.zeros((), jnp.int32))

        def skip(st: TrainState) -> TrainState:
            return st.replace(consecutive_skips=st.consecutive_skips + 1, total_skips=st.total_skips + 1)

        new_state = jax.lax.cond(finite, apply, skip, state)
        new_state = new_state.replace(step=state.step + 1)
        out = {k: v.astype(jnp.float32) for k, v in _scalars(metrics).items()}
        out.update(
            loss=loss.astype(jnp.float32),
            grad_norm=grad_norm.astype(jnp.float32),
            # optax counts applied updates only, so the lr in use is the schedule at that count.
            lr=jnp.asarray(schedule(state.step - state.total_skips), jnp.float32),
            skipped=(~finite).astype(jnp.float32),
            consecutive_skips=new_state.consecutive_skips.astype(jnp.float32),
            total_skips=new_state.total_skips.astype(jnp.float32),
        )
        return new_state, out

    return train_step


def jit_train_step(train_step, state_shardings: TrainState, batch_shardings: PyTree, mesh):
    """jax.jit with explicit in/out shardings; the state argument is donated (updated in place)."""
    repl = NamedSharding(mesh, P())
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, repl),
                   out_shardings=(state_shardings, repl), donate_argnums=(0,))
