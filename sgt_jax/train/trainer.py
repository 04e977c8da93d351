"""`build_trainer(cfg)`: the one place a config becomes a sharded train state and a jitted step.

The training loop, the benchmark and the dry run (tools/bench.py, tools/dry_run.py) all call it, so
what is measured and what is AOT-compiled is exactly what trains: stage -> mesh -> `setup_state`
with shardings -> `make_train_step` -> `jit_train_step` with a donated state, traced under the mesh
and the logical-axis rules. It expects a config that went through `sgt_jax.checks.prepare` (the
entry point's one finalize + validate).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sgt_jax.train import mesh as mesh_lib
from sgt_jax.train import optim, sharding
from sgt_jax.train import state as state_lib
from sgt_jax.train import step as step_lib
from sgt_jax.train.stage import get_stage


def abstract_batch(stage, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The stage's batch spec at `global_batch` rows without allocating it (one-row dummy batch)."""
    one = stage.dummy_batch(1)
    return {k: jax.ShapeDtypeStruct((global_batch,) + tuple(np.shape(v)[1:]), jnp.dtype(v.dtype))
            for k, v in one.items()}


@dataclasses.dataclass
class Trainer:
    """One config's train step and state (the state is None when built abstract)."""

    cfg: ml_collections.ConfigDict
    stage: Any
    mesh: Any
    rules: tuple
    setup: state_lib.StateSetup
    jstep: Any
    batch_shardings: Any
    n_params: int
    n_trainable: int
    name: str = ""

    @property
    def global_batch(self) -> int:
        return int(self.cfg.train.batch_size)

    def context(self) -> contextlib.ExitStack:
        """The trace context of the step (mesh + logical-axis rules)."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def abstract_inputs(self):
        """(state, batch, rng) ShapeDtypeStructs with shardings: what `jstep.lower` needs for AOT.
        Nothing is placed on a device (the rng's dtype comes from `eval_shape`), so this works on
        compile-only devices too."""
        batch = sharding.abstract_with_shardings(self.setup.example_spec, self.batch_shardings)
        key = jax.eval_shape(lambda: jax.random.key(0))
        rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(self.mesh))
        return self.setup.abstract, batch, rng


def build_trainer(cfg: ml_collections.ConfigDict, *, stage=None, materialize: bool = True, name: str = "",
                  seed_key=None, devices=None) -> Trainer:
    """Mesh, state and jitted step for a prepared config. `materialize=False` keeps the state
    abstract (dry runs, or a run about to restore a checkpoint): the batch spec then comes from a
    one-row dummy batch, so nothing model-sized is allocated. `stage` overrides `get_stage(cfg)`.
    `devices` (default: all) may be the compile-only devices of a TPU topology (train/aot.py)."""
    stage = stage if stage is not None else get_stage(cfg)
    mesh = mesh_lib.mesh_from_config(cfg, devices)
    rules = sharding.axis_rules(cfg)
    global_batch = int(cfg.train.batch_size)
    example = stage.dummy_batch(global_batch) if materialize else abstract_batch(stage, global_batch)
    key = seed_key if seed_key is not None else jax.random.key(int(cfg.seed))
    setup = state_lib.setup_state(stage, cfg, mesh, jax.random.fold_in(key, 0), example, materialize=materialize)
    n_train, n_total = optim.trainable_count(setup.abstract.params, setup.labels)
    batch_sh = sharding.batch_shardings(setup.example_spec, mesh, rules)
    jstep = step_lib.jit_train_step(step_lib.make_train_step(stage, cfg, setup.tx, setup.labels, mesh),
                                    setup.shardings, batch_sh, mesh)
    return Trainer(cfg=cfg, stage=stage, mesh=mesh, rules=rules, setup=setup, jstep=jstep, batch_shardings=batch_sh,
                   n_params=int(n_total), n_trainable=int(n_train), name=name)
