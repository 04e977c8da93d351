"""Scale features of the model (issue 10): scanned layers and remat policies, the attention kernels
against the explicit-probabilities path, the tiled / gathered loss against the dense one, and packed
rows against unpacked ones."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgt_jax import config as config_lib
from sgt_jax.models import layers
from sgt_jax.models import llm as llm_lib
from sgt_jax.models import umm as umm_lib
from tests.test_model import forward, make_inputs, model_and_params, random_params, tiny_config

LLM_CFG = llm_lib.LLMConfig(vocab_size=40, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                            attn_bias=True)


def _qkv(b=2, lq=12, lk=12, h=4, kvh=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, lq, h, d), (b, lk, kvh, d), (b, lk, kvh, d)))
    return q, k, v


@pytest.mark.parametrize("kind", ["lengths", "segments", "decode"])
def test_fused_attention_matches_explicit(kind):
    """jax.nn.dot_product_attention from lengths / segment ids == the explicit-probabilities path."""
    if kind == "decode":
        q, k, v = _qkv(lq=1)
        spec = llm_lib.decode_spec(jnp.asarray([3, 9], jnp.int32))
    else:
        q, k, v = _qkv()
        seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], jnp.int32)
        mask = jnp.asarray([[1] * 9 + [0] * 3, [1] * 12], jnp.int32)
        spec = llm_lib.prompt_spec(mask, seg if kind == "segments" else None)
    ref, probs = layers.explicit_attention(q, k, v, spec, return_probs=True)
    out, none = layers.dot_attention(q, k, v, spec.replace(impl="xla"))
    assert none is None and probs.shape == (2, 4, q.shape[1], k.shape[1])
    real = np.ones(q.shape[:2], bool) if kind == "decode" else np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)
    if kind == "segments":  # no probability mass crosses a segment
        assert float(probs[0, :, 6, :5].max()) == 0.0


def test_splash_attention_matches_explicit_interpreted():
    """The Pallas splash kernel (interpreted on CPU) agrees with the reference on padded rows."""
    q, k, v = _qkv(b=1, lq=128, lk=128, h=2, kvh=1, d=128)
    spec = llm_lib.prompt_spec(jnp.asarray([[1] * 100 + [0] * 28], jnp.int32))
    ref, _ = layers.explicit_attention(q, k, v, spec)
    out = layers.splash_attention(q, k, v, spec)
    np.testing.assert_allclose(np.asarray(out)[0, :100], np.asarray(ref)[0, :100], atol=2e-5)
    # A length that is not a multiple of the 128 block (like the ViT's 576) is padded, not refused:
    # bidirectional, two rows of different lengths.
    q, k, v = _qkv(b=2, lq=72, lk=72, h=2, kvh=1, d=128, seed=1)
    spec = layers.AttnSpec(kv_lengths=jnp.asarray([72, 50], jnp.int32), causal=False, impl="splash")
    ref, _ = layers.explicit_attention(q, k, v, spec)
    out, _ = layers.dot_attention(q, k, v, spec)
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out)[0], np.asarray(ref)[0], atol=2e-5)
    np.testing.assert_allclose(np.asarray(out)[1, :50], np.asarray(ref)[1, :50], atol=2e-5)


def test_model_attention_impls_agree_and_return_attn():
    """The UMM forward is the same with XLA and explicit attention; return_attn gives the probs."""
    model, params, _ = model_and_params(False)
    a = make_inputs()
    explicit = umm_lib.UMM(dataclasses_replace_llm(model.cfg, attention="explicit"))
    o1 = forward(False)(params, a)
    o2 = jax.jit(lambda p, x: explicit.apply({"params": p}, x, return_attn=True))(params, a)
    real = np.asarray(a["attn_mask"]) > 0
    np.testing.assert_allclose(np.asarray(o1["text_logits"])[real], np.asarray(o2["text_logits"])[real], atol=1e-4)
    assert o2["attn"].shape == (2, 3, 4, 16, 16)
    np.testing.assert_allclose(np.asarray(o2["attn"]).sum(-1), 1.0, atol=1e-5)


def dataclasses_replace_llm(cfg: umm_lib.UMMConfig, **changes) -> umm_lib.UMMConfig:
    import dataclasses

    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **changes))


def test_layers_are_scanned_with_a_layers_axis():
    _, _, boxed = model_and_params(True)
    q = boxed["llm"]["layers"]["attn"]["q_gen"]["kernel"]
    assert q.names == ("layers", "embed", "heads", "kv") and q.value.shape == (2, 32, 4, 8)
    assert boxed["vit"]["blocks"]["fc1"]["kernel"].names == ("layers", "embed", "mlp")
    cache = umm_lib.init_cache(tiny_config(), 3, 20)
    assert cache["k"].shape == (2, 3, 2, 20, 8) and set(cache) == {"k", "v", "length"}  # head-major


@pytest.mark.parametrize("policy", ["full", "minimal", "save_dots_except_mlp"])
def test_remat_policies_keep_the_gradients(policy):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 10)), jnp.int32)
    abstract = jax.eval_shape(llm_lib.CausalLM(LLM_CFG).init, jax.random.key(0), tokens)["params"]
    params = random_params(nn.meta.unbox(abstract))

    def loss(cfg, p):
        return jnp.mean(llm_lib.CausalLM(cfg).apply({"params": p}, tokens) ** 2)

    import dataclasses

    g0 = jax.jit(jax.grad(functools.partial(loss, LLM_CFG)))(params)
    g1 = jax.jit(jax.grad(functools.partial(loss, dataclasses.replace(LLM_CFG, remat=policy))))(params)
    for x, y in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_scan_unroll_keeps_the_logits():
    import dataclasses

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 10)), jnp.int32)
    abstract = jax.eval_shape(llm_lib.CausalLM(LLM_CFG).init, jax.random.key(0), tokens)["params"]
    params = random_params(nn.meta.unbox(abstract))
    a = llm_lib.CausalLM(LLM_CFG).apply({"params": params}, tokens)
    b = llm_lib.CausalLM(dataclasses.replace(LLM_CFG, scan_unroll=2)).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bad_remat_and_attention_names_are_config_errors():
    cfg = config_lib.default_config()
    cfg.stage = "umm"
    cfg = config_lib.finalize(cfg)  # check_config reads the derived fields (codebook size, code count)
    assert umm_lib.remat_setting(cfg) == "none"
    cfg.train.remat = True
    assert umm_lib.remat_setting(cfg) == "full"
    cfg.train.remat_policy = "save_dots_except_mlp"  # an explicit name wins over train.remat
    assert umm_lib.remat_setting(cfg) == "save_dots_except_mlp"
    cfg.train.remat_policy = "sometimes"
    with pytest.raises(config_lib.ConfigError, match="train.remat_policy.*'sometimes'.*save_dots_except_mlp"):
        umm_lib.check_config(cfg)
    cfg.train.remat_policy = ""
    cfg.model.umm.llm.attention = "flash"
    with pytest.raises(config_lib.ConfigError, match="model.umm.llm.attention.*'flash'.*splash"):
        umm_lib.check_config(cfg)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_chunked_cross_entropy_matches_dense_with_grads(layout):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2, 11, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 30) if layout == "dv" else (30, 8)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 30, (2, 11)), jnp.int32)

    def dense(h, w):
        logits = h @ (w if layout == "dv" else w.T)
        return optax.softmax_cross_entropy_with_integer_labels(logits, t)

    def tiled(h, w):
        return layers.chunked_cross_entropy(h, w, t, 4, layout)[0]

    np.testing.assert_allclose(np.asarray(tiled(h, w)), np.asarray(dense(h, w)), rtol=1e-5, atol=1e-5)
    gd = jax.grad(lambda h, w: jnp.sum(dense(h, w) * jnp.arange(11)), argnums=(0, 1))(h, w)
    gt = jax.grad(lambda h, w: jnp.sum(tiled(h, w) * jnp.arange(11)), argnums=(0, 1))(h, w)
    for x, y in zip(gd, gt, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def _dense_losses(out, inputs, text_tgt, code_pos, codes):
    text_ce = optax.softmax_cross_entropy_with_integer_labels(out["text_logits"], text_tgt)
    logits = jnp.take_along_axis(out["gen_logits"], jnp.clip(code_pos, 0, inputs["tokens"].shape[1] - 1)[..., None],
                                 axis=1)
    return text_ce, optax.softmax_cross_entropy_with_integer_labels(logits, codes)


def test_gathered_and_tiled_losses_match_dense_logits_with_grads():
    """`targets=` (tiled LM head, gen head on the code positions only) == CE of the full logits."""
    model, params, _ = model_and_params(True)
    a = make_inputs()
    tokens = a["tokens"]
    text_tgt = jnp.concatenate([tokens[:, 1:], jnp.zeros((3, 1), jnp.int32)], axis=1)
    code_pos = a["gen_start"][:, None] - 1 + jnp.arange(4)[None]
    targets = {"text": text_tgt, "code_positions": code_pos, "codes": a["codes"]}
    weights = jnp.asarray(a["attn_mask"], jnp.float32)
    gen_w = (code_pos >= 0).astype(jnp.float32)

    def loss_dense(p):
        text_ce, gen_ce = _dense_losses(model.apply({"params": p}, a), a, text_tgt, code_pos, a["codes"])
        return jnp.sum(weights * text_ce) + jnp.sum(gen_w * gen_ce)

    def loss_tiled(p):
        out = model.apply({"params": p}, a, targets=targets, loss_chunk=5)
        return jnp.sum(weights * out["text_ce"]) + jnp.sum(gen_w * out["gen_ce"])

    ld, gd = jax.jit(jax.value_and_grad(loss_dense))(params)
    lt, gt = jax.jit(jax.value_and_grad(loss_tiled))(params)
    np.testing.assert_allclose(float(lt), float(ld), rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(gd), jax.tree_util.tree_leaves(gt), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5)


def test_packed_row_gives_the_unpacked_per_token_losses():
    """Two examples packed in one row (segment ids, RoPE positions restarting) score as alone."""
    model = llm_lib.CausalLM(LLM_CFG)
    rng = np.random.default_rng(1)
    la, lb, length = 7, 5, 14
    ta, tb = rng.integers(0, 40, la), rng.integers(0, 40, lb)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"]
    params = random_params(nn.meta.unbox(abstract))

    def token_ce(p, tokens, mask, seg=None, pos=None):
        llm = llm_lib.LLM(LLM_CFG)

        def run(m, tokens):
            positions = pos if pos is not None else jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            h, *_ = m(m.embed(tokens), jnp.zeros(tokens.shape, bool), positions, llm_lib.prompt_spec(mask, seg))
            return m.logits(h)

        logits = nn.apply(run, llm)({"params": p["llm"]}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])

    packed = np.zeros((1, length), np.int32)
    packed[0, :la], packed[0, la:la + lb] = ta, tb
    seg = np.zeros((1, length), np.int32)
    seg[0, :la], seg[0, la:la + lb] = 1, 2
    pos = np.zeros((1, length), np.int32)
    pos[0, :la], pos[0, la:la + lb] = np.arange(la), np.arange(lb)
    ce_packed = np.asarray(token_ce(params, jnp.asarray(packed), jnp.asarray(seg > 0, jnp.int32), jnp.asarray(seg),
                                    jnp.asarray(pos)))[0]
    alone_a = np.asarray(token_ce(params, jnp.asarray(ta[None]), jnp.ones((1, la), jnp.int32)))[0]
    alone_b = np.asarray(token_ce(params, jnp.asarray(tb[None]), jnp.ones((1, lb), jnp.int32)))[0]
    np.testing.assert_allclose(ce_packed[:la - 1], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ce_packed[la:la + lb - 1], alone_b, rtol=1e-5, atol=1e-5)
    # Per-example mean loss (per-token normalisation within each segment) is the unpacked one.
    np.testing.assert_allclose(ce_packed[la:la + lb - 1].mean(), alone_b.mean(), rtol=1e-5)


def test_grain_packing_rows_and_pipeline_errors():
    """grain first-fit packing: segment ids, restarted positions, loss weights cleared at segment ends."""
    import grain

    from sgt_jax.data import packing

    def example(n, seq=8):
        ex = {"tokens": np.zeros(seq, np.int32), "attn_mask": np.zeros(seq, np.int32),
              "text_loss_weight": np.zeros(seq, np.float32), "gen_loss_mask": np.zeros(seq, np.float32)}
        ex["tokens"][:n] = np.arange(1, n + 1)
        ex["attn_mask"][:n] = 1
        ex["text_loss_weight"][:n - 1] = 1.0
        return ex

    ds = grain.MapDataset.source([example(n) for n in (3, 5, 2, 6)]).to_iter_dataset()
    rows = list(packing.pack(ds, 8, num_bins=2))
    first = rows[0]
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(first["tokens"], [1, 2, 3, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(first["text_loss_weight"], [1, 1, 0, 1, 1, 1, 1, 0])
    assert sum(int(r["attn_mask"].sum()) for r in rows) == 3 + 5 + 2 + 6
    with pytest.raises(ValueError, match="vit_image.*data.packing=False"):
        packing.unpad(dict(example(3), vit_image=np.zeros((2, 2, 3))))


def test_splash_attention_per_shard_under_a_mesh():
    """Under a mesh the splash kernel runs per (batch, head) shard via shard_map; same result."""
    cfg = config_lib.default_config()
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.mesh.axis_rules)
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    q, k, v = _qkv(b=2, lq=128, lk=128, h=4, kvh=2, d=128)
    spec = llm_lib.prompt_spec(jnp.asarray([[1] * 100 + [0] * 28, [1] * 128], jnp.int32))
    ref, _ = layers.explicit_attention(q, k, v, spec)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda q, k, v: layers.splash_attention(q, k, v, spec))(q, k, v)
    real = np.asarray(spec.kv_lengths)[:, None] > np.arange(128)[None]
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)


def test_splash_falls_back_only_where_the_shards_do_not_split_and_says_so(caplog):
    """batch x heads that divide data x fsdp and tensor run splash; the 1-row params-init call falls
    back quietly; any other batch that does not split falls back with a warning (never silently)."""
    import logging

    cfg = config_lib.default_config()
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.mesh.axis_rules)
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), caplog.at_level(logging.WARNING):
        assert layers.splash_shards_evenly(4, 8)
        assert not layers.splash_shards_evenly(1, 8)
        assert not caplog.records
        assert not layers.splash_shards_evenly(3, 8) and not layers.splash_shards_evenly(4, 3)
    assert len(caplog.records) == 2 and "uses XLA attention" in caplog.records[0].getMessage()
    assert layers.splash_shards_evenly(3, 3)  # no mesh: one shard


def test_mot_gathered_routing_equals_routing_over_every_position():
    """MoT with the generation weights on the N + 1 gathered positions == routing over all L."""
    model, params, _ = model_and_params(True)
    a = make_inputs()
    ref = forward(True)(params, a)
    full = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, dict(a, gen_mask=ref["gen_mask"]))
    for key in ("text_logits", "gen_logits"):
        np.testing.assert_allclose(np.asarray(full[key]), np.asarray(ref[key]), atol=1e-5)
    r = llm_lib.gen_route(jnp.asarray([[False, True, True, False], [False] * 4]), 2)
    np.testing.assert_array_equal(np.asarray(r.index), [[1, 2], [0, 1]])
    np.testing.assert_array_equal(np.asarray(r.valid), [[True, True], [False, False]])


_TPU_SPLASH = r'''
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.experimental import topologies
from sgt_jax import config as config_lib
from sgt_jax.models import layers, llm as llm_lib
devs = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
mesh = jax.sharding.Mesh(np.array(devs).reshape(2, 1, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config_lib.default_config().mesh.axis_rules)
def grads(q, k, v, mask):
    spec = llm_lib.prompt_spec(mask).replace(impl="splash")
    loss = lambda q, k, v: jnp.sum(layers.dot_attention(q, k, v, spec)[0].astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
sh = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
for length in (256, 200):  # 200 is not a multiple of the 128 block: padded to 256 for the kernel
    qkv = [jax.ShapeDtypeStruct((4, length, h, 128), jnp.bfloat16, sharding=sh(("data", "fsdp"), None, "tensor"))
           for h in (8, 4, 4)]
    mask = jax.ShapeDtypeStruct((4, length), jnp.int32, sharding=sh(("data", "fsdp"), None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jax.jit(grads).lower(*qkv, mask)
        lowered.compile()
    print("SPLASH_COMPILED", length, "tpu_custom_call" in lowered.as_text())
# one row (the dummy batch that builds params) does not split over data x fsdp = 2: XLA attention
one = [jax.ShapeDtypeStruct((1, 256, h, 128), jnp.bfloat16) for h in (8, 4, 4)]
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = jax.jit(grads).lower(*one, jax.ShapeDtypeStruct((1, 256), jnp.int32))
    lowered.compile()
print("ONE_ROW_SPLASH", "tpu_custom_call" in lowered.as_text())
'''


def test_splash_attention_compiles_for_a_tpu_topology():
    """Forward + backward of the sharded splash kernel compile with the real TPU compiler (libtpu,
    compile-only v5p devices; no chips). Skipped where libtpu is missing or held by another process."""
    import os
    import subprocess
    import sys

    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jax[tpu]')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=root)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _TPU_SPLASH], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode and "libtpu" in proc.stderr and "lockfile" in proc.stderr:
        pytest.skip("libtpu is held by another process (lockfile)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SPLASH_COMPILED 256 True" in proc.stdout and "SPLASH_COMPILED 200 True" in proc.stdout
    assert "ONE_ROW_SPLASH False" in proc.stdout


@pytest.mark.parametrize("dims,lhs_shape,rhs_shape", [
    ((((2,), (0,)), ((), ())), (3, 5, 4), (4, 6)),  # a dense layer on [B, L, D]
    ((((2, 3), (0, 1)), ((), ())), (3, 5, 2, 4), (2, 4, 6)),  # an output projection [B, L, H, hd] x [H, hd, D]
    ((((2,), (1,)), ((), ())), (3, 5, 4), (7, 4)),  # a tied-embedding head [B, L, D] x [V, D]
    ((((1,), (0,)), ((), ())), (5, 4), (4, 6)),  # already 2-D: passed through
    ((((2,), (2,)), ((0,), (0,))), (3, 5, 4), (3, 6, 4)),  # batch dims: passed through
])
def test_flat_dot_general_equals_dot_general_with_grads(dims, lhs_shape, rhs_shape):
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (lhs_shape, rhs_shape))

    def loss(f, x, w):
        return jnp.sum(jnp.sin(f(x, w, dims)))

    want = jax.lax.dot_general(x, w, dims)
    got = layers.flat_dot_general(x, w, dims)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.grad(functools.partial(loss, layers.flat_dot_general), (0, 1))(x, w),
                    jax.grad(functools.partial(loss, jax.lax.dot_general), (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_decode_step_updates_the_stacked_cache_in_place():
    """The cache rides in the layer scan's carry: the compiled decode loop writes each new K/V row
    with a scatter and never copies, re-stacks or re-zeroes the whole [depth, B, kv, S, hd] cache
    (which made each decode step copy the cache twice). Checked on the compiled HLO of a decode loop."""
    import re

    model, params, _ = model_and_params(False)
    b, s = 3, 24
    cache = umm_lib.init_cache(model.cfg, b, s)
    cache["length"] = jnp.asarray([2, 5, 7], jnp.int32)
    ones = jnp.ones((b,), jnp.int32)
    step = {"tokens": jnp.zeros((b,), jnp.int32), "codes": ones, "is_code": ones, "gen": ones}

    def loop(p, c):
        def body(_, carry):
            acc, c = carry
            o, c = model.apply({"params": p}, step, c, method="decode_step")
            return acc + o["gen_logits"].sum(), c
        return jax.lax.fori_loop(0, 4, body, (0.0, c))

    hlo = jax.jit(loop, donate_argnums=1).lower(params, cache).compile().as_text()
    cfg = model.cfg.llm
    full = f"f32[{cfg.depth},{b},{cfg.num_kv_heads},{s},{cfg.head_dim}]"
    ops = [m.group(1) for line in hlo.splitlines() if full in line.split("=", 1)[-1].split("(", 1)[0]
           for m in [re.search(r"=\s*\S+\s+([a-z\-]+)\(", line)] if m]
    assert "scatter" in " ".join(ops) or any("fusion" == o for o in ops), ops
    assert not {"copy", "broadcast", "concatenate"} & set(ops), ops
    # and the loop's result equals step-by-step decoding
    _, c_loop = jax.jit(loop)(params, cache)
    c = cache
    for _ in range(4):
        _, c = model.apply({"params": params}, step, c, method="decode_step")
    for key in ("k", "v", "length"):
        np.testing.assert_allclose(np.asarray(c_loop[key]), np.asarray(c[key]), atol=1e-6)


@pytest.mark.parametrize("lq", [1, 3])
def test_cached_attention_over_the_head_major_cache_matches_explicit(lq):
    q, k, v = _qkv(b=3, lq=lq, lk=12)
    spec = layers.AttnSpec(kv_lengths=jnp.asarray([4, 12, 9], jnp.int32), causal=False)
    want, want_p = layers.explicit_attention(q, k, v, spec, True)
    got, got_p = layers.cached_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), spec, True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_p), np.asarray(want_p), atol=1e-6)
