"""The Stage protocol: what a training stage (VQ tokenizer, UMM) supplies to the generic loop.

The loop (mesh, optimizer, checkpointing, metrics) is identical for every stage; everything that
depends on the model or the data lives behind this small interface, so adding a stage never touches
the training core. Stages are looked up by `cfg.stage` through `get_stage(cfg)`.

Conventions every stage follows
- Params are fp32 Flax Linen pytrees whose leaves are boxed with logical axis names
  (`nn.with_logical_partitioning` / `nn.LogicallyPartitioned`) so the loop can shard them from
  `cfg.mesh.axis_rules`. Unboxed leaves are replicated. `model_state` (non-trainable collections,
  e.g. codebook usage counters) follows the same rule; use `{}` when there is none.
- Compute dtype comes from `cfg.train.compute_dtype`; remat from `cfg.train.remat`.
- `loss_fn` and `post_update` are traced inside the jitted train step: pure jnp, no Python side
  effects, `step` is a traced int32 scalar (use `lax.cond`/`jnp.where`, not `if`).
- Metrics returned by `loss_fn` are a flat dict of arrays. Scalars (ndim 0) are averaged over
  micro-batches and logged; non-scalar entries are passed to `post_update` only (e.g. a sample of
  encoder outputs for dead-code re-initialisation) and never logged.
- Parameter paths (for `frozen`, `cfg.optim.freeze`, `init_from` mappings) are the '/'-joined dict
  keys of the unboxed params tree, e.g. "encoder/block_0/attn/query/kernel".
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import ml_collections

from sgt_jax.data.mixture import Mixture

PyTree = Any
Batch = Mapping[str, Any]
Metrics = dict[str, Any]


@runtime_checkable
class Stage(Protocol):
    """Interface between the generic training loop and one model/data stage (see module docstring)."""

    cfg: ml_collections.ConfigDict
    # Regexes (re.search on the '/'-joined param path) of parameters that never change during this
    # stage. Combined with `cfg.optim.freeze`. Frozen params stay bitwise unchanged.
    frozen: tuple[str, ...]
    # Extra regexes of params exempt from weight decay (1-d leaves, norms, biases, scales already are).
    no_decay: tuple[str, ...]

    def dummy_batch(self, batch_size: int) -> dict[str, Any]:
        """A batch with the exact shapes/dtypes the data pipeline yields (numpy arrays or
        jax.ShapeDtypeStruct); used to init and compile without touching the data."""

    def init(self, rng, example_batch: Batch) -> tuple[PyTree, PyTree]:
        """-> (params, model_state). Traced under `jax.eval_shape` and `jax.jit(out_shardings=...)`,
        so it must be pure; `example_batch` may hold ShapeDtypeStructs."""

    def loss_fn(self, params: PyTree, model_state: PyTree, batch: Batch, rng, step
                ) -> tuple[Any, tuple[Metrics, PyTree]]:
        """-> (scalar loss, (metrics, new_model_state)). Params arrive unboxed and fp32."""

    # Optional: None, or a callable
    #   post_update(params, model_state, aux_metrics, rng, step) -> (params, model_state)
    # run in-graph after the optimizer update (only on non-skipped steps), e.g. VQ dead-code re-init.
    post_update: Callable[..., tuple[PyTree, PyTree]] | None

    def flops_per_example(self) -> float:
        """Analytic training FLOPs (forward + backward, ~3x forward) for one example; for MFU."""

    def tokens_per_example(self) -> float:
        """Tokens (or pixels/patches: whatever the stage's throughput unit is) per example; 0 = n/a."""

    def example_transform(self, split: str) -> Callable | Mixture:
        """What `sgt_jax.data.pipeline.make_iterator(cfg, split, transform, ...)` takes:
        `transform(record, rng) -> example dict`, or the run's `Mixture` with its task transforms.
        Batch keys the stage's `dummy_batch` does not declare are dropped before the step."""

    def make_iterator(self, split: str, *, global_batch_size: int, process_index: int, process_count: int,
                      seed: int) -> Iterator[dict] | None:
        """Optional data override: a checkpointable iterator (get_state/set_state) yielding this
        process's slice of each global batch (rows [i*B/n, (i+1)*B/n) for process i of n), or None
        to use `sgt_jax.data.pipeline.make_iterator` with `example_transform(split)`."""

    def evaluate(self, params: PyTree, model_state: PyTree, *, step: int, workdir: str) -> dict[str, float]:
        """Evaluate (EMA params if enabled, unboxed); returns scalar metrics, e.g. {"eval/miou": ...}.
        Called by the loop every `cfg.eval.every_steps` and at the end, on EVERY process (params are
        global arrays, so jitted evaluation is a collective); write files only from process 0."""


class BaseStage:
    """Defaults for the optional parts of `Stage`; concrete stages subclass it."""

    frozen: tuple[str, ...] = ()
    no_decay: tuple[str, ...] = ()
    post_update = None

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg

    def tokens_per_example(self) -> float:
        return 0.0

    def example_transform(self, split: str) -> Callable | Mixture:
        raise NotImplementedError(f"{type(self).__name__} supplies no data transform")

    def make_iterator(self, split, *, global_batch_size, process_index, process_count, seed):
        return None

    def evaluate(self, params, model_state, *, step, workdir) -> dict[str, float]:
        return {}


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
# Built-in stages are imported lazily (their modules pull in models) the first time they are asked for.
_BUILTIN = {
    "vq": "sgt_jax.train.stages.vq_stage",
    "umm": "sgt_jax.train.stages.umm_stage",
}
_REGISTRY: dict[str, Callable[[ml_collections.ConfigDict], Stage]] = {}


def register_stage(name: str):
    """Class decorator: `@register_stage("vq") class VQStage(BaseStage): ...`."""
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def get_stage(cfg: ml_collections.ConfigDict) -> Stage:
    """Build the stage named by `cfg.stage`."""
    name = cfg.stage
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise KeyError(f"config field 'stage' = {name!r} has no registered implementation; "
                       f"registered: {sorted(set(_REGISTRY) | set(_BUILTIN))}")
    return _REGISTRY[name](cfg)
