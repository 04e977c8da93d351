"""A small real stage for the training-core tests: an MLP regressing a fixed random teacher.

It exercises everything the loop relies on (logical axis names, model_state, post_update, a frozen
sub-module, a checkpointable grain iterator with per-process slicing) at a cost of milliseconds.
"""
from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.config import default_config
from sgt_jax.train.stage import BaseStage

D_IN, HIDDEN, D_OUT = 8, 32, 4


class ToyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(D_IN, name="frozen_in",
                     kernel_init=nn.with_logical_partitioning(init, ("embed", "embed_out")))(x)
        x = nn.Dense(HIDDEN, name="hidden",
                     kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        x = nn.LayerNorm(name="norm", scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        x = nn.gelu(x)
        return nn.Dense(D_OUT, name="out", kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(x)


def _teacher():
    return np.random.default_rng(1234).normal(size=(D_IN, D_OUT)).astype(np.float32)


def make_example(i: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, int(i)])
    x = rng.normal(size=(D_IN,)).astype(np.float32)
    return {"x": x, "y": np.tanh(x @ _teacher()).astype(np.float32)}


def toy_config(**train):
    cfg = default_config()
    cfg.train.steps = 8
    cfg.train.batch_size = 16
    cfg.train.log_every = 4
    cfg.optim.lr = 1e-2
    cfg.optim.warmup_steps = 2
    cfg.checkpoint.every_steps = 4
    cfg.checkpoint.async_save = True
    cfg.mesh.axis_rules = tuple(cfg.mesh.axis_rules) + (("embed_out", None),)
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


class ToyStage(BaseStage):
    """Regression stage. `model_state` counts examples seen; post_update keeps `out` kernel rows
    bounded (an in-graph parameter edit like VQ dead-code re-init)."""

    frozen = ("frozen_in/",)

    def __init__(self, cfg, nan_steps=(), dataset_size=4096):
        super().__init__(cfg)
        self.model = ToyMLP()
        self.nan_steps = tuple(nan_steps)
        self.dataset_size = dataset_size

    def dummy_batch(self, batch_size):
        return {"x": np.zeros((batch_size, D_IN), np.float32), "y": np.zeros((batch_size, D_OUT), np.float32)}

    def init(self, rng, example_batch):
        params = self.model.init(rng, example_batch["x"])["params"]
        return params, {"seen": jnp.zeros((), jnp.float32)}

    def loss_fn(self, params, model_state, batch, rng, step):
        dtype = jnp.bfloat16 if self.cfg.train.compute_dtype == "bfloat16" else jnp.float32
        p = jax.tree.map(lambda a: a.astype(dtype), params)
        pred = self.model.apply({"params": p}, batch["x"].astype(dtype)).astype(jnp.float32)
        noise = 1e-3 * jax.random.normal(rng, pred.shape)  # rng enters the loss: resume must replay it
        err = (pred + noise - batch["y"]) ** 2
        loss = jnp.mean(err)
        if self.nan_steps:
            bad = jnp.isin(step, jnp.asarray(self.nan_steps))
            loss = jnp.where(bad, jnp.nan, loss)
        metrics = {"mse": jnp.mean(err), "per_row_err": jnp.mean(err, axis=1)}
        return loss, (metrics, {"seen": model_state["seen"] + batch["x"].shape[0]})

    def post_update(self, params, model_state, aux, rng, step):
        k = params["out"]["kernel"]
        k = k / jnp.maximum(1.0, jnp.linalg.norm(k, axis=1, keepdims=True) / 10.0)
        params = {**params, "out": {**params["out"], "kernel": k}}
        return params, model_state

    def flops_per_example(self):
        return 6.0 * (D_IN * D_IN + D_IN * HIDDEN + HIDDEN * D_OUT)

    def tokens_per_example(self):
        return 1.0

    def make_iterator(self, split, *, global_batch_size, process_index, process_count, seed):
        per = global_batch_size // process_count
        lo = process_index * per
        ds = (grain.MapDataset.range(self.dataset_size)
              .shuffle(seed=seed)
              .map(lambda i: make_example(i, seed))
              .batch(global_batch_size, drop_remainder=True)
              .map(lambda b: {k: v[lo:lo + per] for k, v in b.items()})
              .repeat(None))
        return iter(ds.to_iter_dataset())

    def evaluate(self, params, model_state, *, step, workdir):
        batch = {k: np.stack([make_example(i, 99)[k] for i in range(64)]) for k in ("x", "y")}
        mse = jax.jit(lambda p, x, y: jnp.mean((self.model.apply({"params": p}, x) - y) ** 2))
        return {"eval/mse": float(mse(params, batch["x"], batch["y"]))}
