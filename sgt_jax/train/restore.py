"""Restoring a trained UMM run for sampling and evaluation: its saved config, params and frozen VQ.

Lives in the train layer because the parameter tree is the UMM stage's (`{"umm": ..., "vq": ...}`)
and the files are its checkpoints; the sampler (infer) and the evaluators (eval) take the result.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from sgt_jax import config as config_lib
from sgt_jax.models import umm as umm_lib
from sgt_jax.models import vq as vq_lib
from sgt_jax.train import checkpoint as ckpt_lib
from sgt_jax.train.stages import umm_stage


class Loaded(NamedTuple):
    cfg: Any  # ml_collections.ConfigDict of the run
    model: umm_lib.UMM
    params: Any  # UMM params
    vq_model: vq_lib.VQModel
    vq_params: Any
    step: int


def saved_config(workdir: str, step: int = -1):
    """The experiment config a run saved in its checkpoint metadata, over the current defaults
    (`config.from_saved`: finalized when it was saved, so its derived fields are kept)."""
    saved = ckpt_lib.read_metadata(workdir, step).get("config")
    if not saved:
        raise ValueError(f"checkpoint under {workdir!r} has no config in its metadata; pass a config explicitly")
    return config_lib.from_saved(saved)


def saved_stage(workdir: str, step: int = -1) -> str | None:
    """The stage ("vq" | "umm") that wrote a workdir's checkpoint, None when it has none."""
    try:
        meta = ckpt_lib.read_metadata(workdir, step)
    except FileNotFoundError:
        return None
    if meta.get("stage"):
        return meta["stage"]
    saved = meta.get("config")
    return config_lib.from_saved(saved).stage if saved else None


def load_umm(workdir: str, *, step: int = -1, cfg=None, use_ema: bool = True) -> Loaded:
    """Restore a UMM run's params (EMA when present) and its frozen VQ from `workdir`'s checkpoint
    (latest unless `step`), with the run's saved config unless `cfg` (finalized) is given. Single device."""
    if cfg is None:
        cfg = saved_config(workdir, step)
    stage = umm_stage.UMMStage(cfg)
    boxed, _ = jax.eval_shape(lambda k: stage.init(k, stage.dummy_batch(1)), jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32 if jnp.issubdtype(
        s.dtype, jnp.floating) else s.dtype, sharding=device), nn.unbox(boxed))
    params, loaded = ckpt_lib.load_params(workdir, target, step=step, use_ema=use_ema)
    missing = len(jax.tree.leaves(target)) - len(loaded)
    if missing:
        raise ValueError(f"checkpoint under {workdir!r} lacks {missing} of the UMM/VQ parameter arrays this "
                         "config builds; is it a UMM-stage run, and does the config match?")
    used = ckpt_lib.resolve_step_dir(workdir, step)
    return Loaded(cfg, stage.model, params[umm_stage.UMM_KEY], stage.vq, params[umm_stage.VQ_KEY],
                  int(used.name))
