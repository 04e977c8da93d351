"""Gradient accumulation: per-task metrics are token means however the batch is split, and frozen
leaves get no gradient buffers."""
import jax
import jax.numpy as jnp
import numpy as np
from train_toy_stage import D_IN, D_OUT, ToyStage, toy_config

from sgt_jax.train import mesh as mesh_lib
from sgt_jax.train import state as state_lib
from sgt_jax.train import step as step_lib
from sgt_jax.train.metrics import Ratio


class TaskToyStage(ToyStage):
    """The toy regression with a task id per row and per-task losses as Ratio(sum, count)."""

    def dummy_batch(self, batch_size):
        return {**super().dummy_batch(batch_size), "task": np.zeros((batch_size,), np.int32)}

    def loss_fn(self, params, model_state, batch, rng, step):
        pred = self.model.apply({"params": params}, batch["x"])
        err = jnp.mean((pred - batch["y"]) ** 2, axis=1)
        metrics = {"mse": jnp.mean(err)}
        for t in (0, 1):
            sel = (batch["task"] == t).astype(jnp.float32)
            metrics[f"loss/task{t}"] = Ratio(jnp.sum(sel * err), jnp.sum(sel))
        return jnp.mean(err), (metrics, model_state)


def _batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, D_IN)).astype(np.float32)
    y = rng.normal(size=(16, D_OUT)).astype(np.float32)
    # Task 1 only on even rows: with accum=2, micro-batch a takes rows i*2 + a, so micro-batch 1 has no
    # task-1 row at all, and the micro-batches hold different numbers of task-0 rows (4 of 8 vs 8 of 8).
    task = np.where(np.arange(16) % 4 == 0, 1, 0).astype(np.int32)
    return {"x": x, "y": y, "task": task}


def _run(accum):
    cfg = toy_config(tensorboard=False)
    cfg.optim.grad_accum_steps = accum
    stage = TaskToyStage(cfg)
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    setup = state_lib.setup_state(stage, cfg, mesh, jax.random.key(0), stage.dummy_batch(16))
    fn = step_lib.make_train_step(stage, cfg, setup.tx, setup.labels, mesh)
    with jax.set_mesh(mesh):
        _, metrics = jax.jit(fn)(setup.state, _batch(), jax.random.key(1))
    return stage, setup, jax.device_get(metrics)


def test_per_task_metrics_are_token_means_under_accumulation():
    stage, setup, one = _run(1)
    _, _, two = _run(2)
    b = _batch()
    pred = stage.model.apply({"params": jax.device_get(setup.state.params)}, b["x"])
    err = np.mean((np.asarray(pred) - b["y"]) ** 2, axis=1)
    for t in (0, 1):
        want = err[b["task"] == t].mean()
        np.testing.assert_allclose(one[f"loss/task{t}"], want, rtol=1e-5)
        np.testing.assert_allclose(two[f"loss/task{t}"], want, rtol=1e-5)  # not NaN, not a mean of means
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)


def _scan_carry_shapes(jaxpr) -> list[tuple]:
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
            out += [tuple(v.aval.shape) for v in eqn.invars[n_consts:n_consts + n_carry]]
    return out


def test_frozen_leaves_get_no_gradient_buffers():
    cfg = toy_config(tensorboard=False)
    cfg.optim.grad_accum_steps = 2
    stage = ToyStage(cfg)
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    setup = state_lib.setup_state(stage, cfg, mesh, jax.random.key(0), stage.dummy_batch(16))
    fn = step_lib.make_train_step(stage, cfg, setup.tx, setup.labels, mesh)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(fn)(setup.state, stage.dummy_batch(16), jax.random.key(1)).jaxpr
    carry = _scan_carry_shapes(jaxpr)
    # ToyStage freezes frozen_in/{kernel (8, 8), bias (8,)}; the trainable leaves have other shapes.
    trainable = {tuple(x.shape) for x, lab in zip(jax.tree.leaves(setup.state.params), jax.tree.leaves(setup.labels),
                                                   strict=True) if lab == "train"}
    assert trainable <= set(carry)  # the f32 accumulators of the trainable leaves are in the scan carry
    assert (D_IN, D_IN) not in carry
    assert carry.count((D_IN,)) == 1  # the (micro-batch,) per_row_err metric, not the frozen bias
    # What is differentiated (for accum=1 too) is the trainable partition only.
    train_p, frozen_p = step_lib.split_trainable(setup.state.params, setup.labels)
    assert sorted(tuple(x.shape) for x in frozen_p) == [(D_IN,), (D_IN, D_IN)]
    assert len(train_p) == len(jax.tree.leaves(setup.state.params)) - 2
