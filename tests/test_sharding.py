"""Logical-axis sharding: every name ruled, optimizer state sharded like its parameter, umm_7b's
FSDP x tensor layout (K/V heads, KV cache and the generation head), on 8 simulated CPU devices."""
import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax import checks
from sgt_jax.config import load_config
from sgt_jax.models import llm as llm_lib
from sgt_jax.models import umm as umm_lib
from sgt_jax.train import mesh as mesh_lib
from sgt_jax.train import sharding
from sgt_jax.train import state as state_lib
from sgt_jax.train.stage import get_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# Configs whose get_config needs an option to pick a sweep point.
CONFIG_ARGS = {"ablation_shapes.py": "proxy=segmentation", "post_shapes.py": "proxy=segmentation"}


def _abstract_boxed_params(cfg):
    """(boxed abstract params + model state, activation names) of a config's stage, traced only."""
    stage = get_stage(cfg)
    one = stage.dummy_batch(1)
    batch = {k: jax.ShapeDtypeStruct((1,) + tuple(np.shape(v)[1:]), jnp.dtype(v.dtype)) for k, v in one.items()}
    rules = sharding.axis_rules(cfg)
    seen: set[str] = set()
    real = nn.with_logical_constraint

    def record(x, names, *a, **k):
        seen.update(n for n in names if isinstance(n, str))
        return real(x, names, *a, **k)

    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn, "with_logical_constraint", record)
        with nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(lambda k: stage.init(k, zeros()), jax.random.key(0))
            params, model_state = nn.unbox(boxed)
            jax.eval_shape(lambda p, b: stage.loss_fn(p, model_state, b, jax.random.key(1), 0), params, batch)
    return boxed, seen, rules


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_logical_axis_of_every_config_has_a_rule(path):
    arg = CONFIG_ARGS.get(os.path.basename(path))
    cfg = checks.prepare(load_config(path + (f":{arg}" if arg else "")))
    boxed, activation_names, rules = _abstract_boxed_params(cfg)
    param_names = sharding.logical_names(boxed)
    assert param_names, "no boxed parameters found: the walk would pass vacuously"
    if cfg.stage != "vq":  # the VQ model constrains no activation; the LLM/UMM ones do
        assert activation_names, "no logical constraints recorded: the walk would pass vacuously"
    assert sharding.unruled(param_names, rules) == [], f"{path}: parameter axes without a rule"
    assert sharding.unruled(activation_names, rules) == [], f"{path}: activation axes without a rule"


def test_unruled_name_is_reported():
    with pytest.raises(ValueError, match=r"\['kv_heads'\].*mesh.axis_rules"):
        sharding.check_ruled({"embed", "kv_heads"}, (("embed", "fsdp"),))


def _umm7b_like():
    """umm_7b's axis rules and mesh layout (1, fsdp, tensor) at smoke size on 8 devices."""
    cfg = load_config(os.path.join(ROOT, "configs", "umm_7b.py") + ":smoke")
    cfg.mesh.shape = (1, 4, 2)  # smoke ViT has 2 heads
    cfg.optim.ema_decay = 0.999  # the EMA copy must follow the params too
    return checks.prepare(cfg, jax.device_count())


def test_umm7b_layout_kv_heads_gen_head_and_optimizer_state():
    cfg = _umm7b_like()
    stage = get_stage(cfg)
    mesh = mesh_lib.mesh_from_config(cfg)
    example = stage.dummy_batch(int(cfg.train.batch_size))
    setup = state_lib.setup_state(stage, cfg, mesh, jax.random.key(0), example, materialize=False)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.sharding.spec
            for path, leaf in jax.tree_util.tree_flatten_with_path(setup.abstract.params)[0]}
    kv = [p for p in flat if p.endswith(("attn/k/kernel", "attn/v/kernel"))]
    assert kv, sorted(flat)[:20]
    for p in kv:  # [(layers,) embed, kv_heads, head_dim]
        assert tuple(flat[p])[-3:] == ("fsdp", "tensor", None), (p, flat[p])
    fc2 = [p for p in flat if p.endswith("gen_head/fc2/kernel")]  # [mlp, vocab]: see mesh.axis_rules
    assert len(fc2) == 1 and tuple(flat[fc2[0]]) == ("tensor", None), {p: flat[p] for p in fc2}
    # Every Adam moment and the EMA copy has exactly its parameter's sharding.
    shard = setup.shardings
    params_specs = jax.tree.map(lambda s: s.spec, shard.params)
    ema_specs = jax.tree.map(lambda s: s.spec, shard.ema_params)
    assert ema_specs == params_specs
    moments = 0
    for path, s in jax.tree_util.tree_flatten_with_path(shard.opt_state)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "mu" in keys or "nu" in keys:
            sub = keys[keys.index("mu" if "mu" in keys else "nu") + 1:]
            node = params_specs
            for k in sub:
                node = node[k]
            assert s.spec == node, (keys, s.spec, node)
            moments += 1
    assert moments >= 2 * len(flat) - 2 * sum(1 for p in flat if "vq" in p.split("/")[:1])
    # A materialised state lands where the shardings say.
    st = state_lib.setup_state(stage, cfg, mesh, jax.random.key(0), example, materialize=True).state
    k_leaf = next(leaf for path, leaf in jax.tree_util.tree_flatten_with_path(st.params)[0]
                  if "/".join(str(getattr(k, "key", k)) for k in path) == kv[0])
    assert tuple(k_leaf.sharding.spec)[-3:] == ("fsdp", "tensor", None)
    assert k_leaf.addressable_shards[0].data.shape[-2] == k_leaf.shape[-2] // 2


def test_kv_cache_sharded_over_tensor():
    cfg = _umm7b_like()
    mesh = mesh_lib.mesh_from_config(cfg)
    rules = sharding.axis_rules(cfg)
    mcfg = umm_lib.UMMConfig.from_config(cfg)
    cache = jax.eval_shape(lambda: llm_lib.init_cache(mcfg.llm, 4, 16))
    shard = sharding.kv_cache_shardings(cache, mesh, rules)
    specs = {s.spec for s in jax.tree.leaves(shard)}
    kv_specs = [s.spec for c, s in zip(jax.tree.leaves(cache), jax.tree.leaves(shard), strict=True) if c.ndim >= 4]
    assert kv_specs and all(s[-3] == "tensor" for s in kv_specs), specs  # [layers, B, KVH, S, D]
    cache = jax.jit(lambda: llm_lib.init_cache(mcfg.llm, 4, 16), out_shardings=shard)()
    leaf = next(c for c in jax.tree.leaves(cache) if c.ndim >= 4)
    assert leaf.addressable_shards[0].data.shape[-3] == leaf.shape[-3] // 2
