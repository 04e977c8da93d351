"""UMM model tests: shapes, logical names, masks (padding, causality), span splicing, MoT routing,
remat/bf16, and KV-cache decoding == uncached recomputation (text and codes, with and without MoT)."""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax import checks
from sgt_jax import config as config_lib
from sgt_jax.models import umm as umm_lib

B, L = 3, 16


def tiny_config(mot: bool = False, **train):
    cfg = config_lib.default_config()
    cfg.stage = "umm"
    cfg.data.image_size = 16
    cfg.model.vq.downsample = 8  # 2x2 = 4 codes
    cfg.model.vq.codebook_size = 32
    u = cfg.model.umm
    u.llm.update(dict(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                      attn_bias=True, tied_embeddings=False, qk_norm=True))
    u.vit.update(dict(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32))
    u.update(dict(mot=mot, gen_embed_dim=8, gen_adapter_dim=32, gen_head_dim=32, und_adapter_dim=32))
    for k, v in train.items():
        cfg.train[k] = v
    checks.prepare(cfg)  # derives codebook_size 32 and num_codes 4
    return umm_lib.UMMConfig.from_config(cfg)


def make_inputs(seed: int = 0, lengths=(16, 11, 13)) -> dict:
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    return {
        "tokens": jnp.asarray(rng.integers(0, 64, (B, L)), jnp.int32),
        "attn_mask": jnp.asarray(mask),
        "vit_images": jnp.asarray(rng.uniform(-1, 1, (B, 16, 16, 3)), jnp.float32),
        "vit_start": jnp.asarray([1, -1, 2], jnp.int32),  # row 1 has no understanding image
        "codes": jnp.asarray(rng.integers(0, 32, (B, 4)), jnp.int32),
        "gen_start": jnp.asarray([8, 4, -1], jnp.int32),  # row 2 has no generation image
    }


def random_params(abstract, seed: int = 0):
    """Fill an abstract (eval_shape) param tree with numpy noise.

    Compiling the real initializers costs ~15 s on a loaded 2-core machine (one RNG program per
    leaf); the tests only need generic random weights: kernels ~ N(0, 1/fan_in), norm scales ~ 1.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = leaf.shape
        if any(str(getattr(k, "key", k)) in ("layers", "blocks") for k in path):
            leaf = jax.ShapeDtypeStruct(shape[1:], leaf.dtype)  # fan-in of one scanned layer
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape), jnp.float32)
        fan_in = leaf.shape[0] if leaf.ndim > 1 else 1
        if name == "kernel" and leaf.ndim == 3 and str(getattr(path[-2], "key", "")).startswith("o"):
            fan_in = leaf.shape[0] * leaf.shape[1]
        if name == "kernel" and leaf.ndim == 4:  # conv
            fan_in = int(np.prod(leaf.shape[:3]))
        std = 0.5 if name == "embedding" else (0.05 if name == "bias" else fan_in ** -0.5)
        return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def model_and_params(mot: bool):
    mc = tiny_config(mot)
    model = umm_lib.UMM(mc)
    boxed = jax.eval_shape(model.init, jax.random.key(0), make_inputs())["params"]
    return model, random_params(nn.meta.unbox(boxed)), boxed


@functools.lru_cache(maxsize=None)
def forward(mot: bool):
    model, _, _ = model_and_params(mot)
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def _real(x, inputs):
    """Zero out padded positions so comparisons only look at real ones."""
    return np.where(np.asarray(inputs["attn_mask"])[..., None] > 0, np.asarray(x), 0.0)


def test_shapes_names_and_optional_outputs():
    model, params, boxed = model_and_params(False)
    inputs = make_inputs()
    out = jax.jit(functools.partial(model.apply, return_hidden=True, return_attn=True, return_vit_hidden=True))(
        {"params": params}, inputs)
    assert out["text_logits"].shape == (B, L, 64) and out["text_logits"].dtype == jnp.float32
    assert out["gen_logits"].shape == (B, L, 32) and out["gen_logits"].dtype == jnp.float32
    assert out["hidden"].shape == (3, B, L, 32)
    assert out["attn"].shape == (2, B, 4, L, L)
    assert out["vit_hidden"].shape == (3, B, 4, 16)
    np.testing.assert_allclose(np.asarray(out["attn"]).sum(-1), 1.0, atol=1e-5)
    assert "hidden" not in forward(False)(params, inputs)  # opt-in only
    # Every parameter carries logical axis names, one per dimension.
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)
    # gen mask: <boi> + the 4 code positions of rows 0 and 1, nothing in row 2.
    gen = np.asarray(out["gen_mask"])
    assert gen[0, 7:12].all() and gen[0].sum() == 5 and gen[1, 3:8].all() and gen[1].sum() == 5
    assert not gen[2].any()


def test_padding_is_not_attended():
    _, params, _ = model_and_params(False)
    a = make_inputs()
    b = dict(a)
    pad = np.asarray(a["attn_mask"]) == 0
    b["tokens"] = jnp.where(pad, (a["tokens"] + 7) % 64, a["tokens"])
    oa, ob = forward(False)(params, a), forward(False)(params, b)
    assert not np.allclose(np.asarray(oa["text_logits"])[pad], np.asarray(ob["text_logits"])[pad])
    for key in ("text_logits", "gen_logits"):
        np.testing.assert_allclose(_real(oa[key], a), _real(ob[key], a), atol=1e-6)


def test_causal():
    _, params, _ = model_and_params(False)
    a = make_inputs()
    t = 12  # a text position in row 0 (after the code span 8..11)
    b = dict(a, tokens=a["tokens"].at[0, t].set((a["tokens"][0, t] + 1) % 64))
    oa, ob = forward(False)(params, a), forward(False)(params, b)
    la, lb = np.asarray(oa["text_logits"]), np.asarray(ob["text_logits"])
    np.testing.assert_allclose(la[0, :t], lb[0, :t], atol=1e-6)
    assert np.abs(la[0, t:] - lb[0, t:]).max() > 1e-4
    np.testing.assert_allclose(la[1:], lb[1:], atol=1e-6)  # other rows untouched


def test_vit_span_is_spliced():
    model, params, _ = model_and_params(False)
    a = make_inputs()
    x, gen, _ = model.apply({"params": params}, a, method=umm_lib.UMM.embed_inputs)
    feats = model.apply({"params": params}, a["vit_images"],
                        method=lambda m, im: m.und_adapter(m.vit(im)["tokens"]))
    np.testing.assert_allclose(np.asarray(x[0, 1:5]), np.asarray(feats[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(x[2, 2:6]), np.asarray(feats[2]), atol=1e-6)
    tok = model.apply({"params": params}, a["tokens"], method=lambda m, t: m.llm.embed(t))
    np.testing.assert_allclose(np.asarray(x[1, :3]), np.asarray(tok[1, :3]), atol=0)  # row 1: no image
    np.testing.assert_allclose(np.asarray(x[0, 0]), np.asarray(tok[0, 0]), atol=0)
    # A different image changes outputs from the span on, never before it, and not in row 1.
    b = dict(a, vit_images=-a["vit_images"])
    la, lb = np.asarray(forward(False)(params, a)["text_logits"]), np.asarray(forward(False)(params, b)["text_logits"])
    np.testing.assert_allclose(la[0, :1], lb[0, :1], atol=1e-6)
    np.testing.assert_allclose(la[2, :2], lb[2, :2], atol=1e-6)
    np.testing.assert_allclose(_real(la, a)[1], _real(lb, a)[1], atol=1e-6)
    assert np.abs(la[0, 1:] - lb[0, 1:]).max() > 1e-4


def test_code_span_and_gen_logits():
    model, params, _ = model_and_params(False)
    a = make_inputs()
    x, _, _ = model.apply({"params": params}, a, method=umm_lib.UMM.embed_inputs)
    emb = model.apply({"params": params}, a["codes"], method=umm_lib.UMM.embed_codes)
    np.testing.assert_allclose(np.asarray(x[0, 8:12]), np.asarray(emb[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(x[1, 4:8]), np.asarray(emb[1]), atol=1e-6)
    # gen logits at position p predict the code at p+1: changing code i (at gen_start + i) leaves the
    # gen logits that predict it (position gen_start + i - 1) and everything before unchanged.
    i = 2
    b = dict(a, codes=a["codes"].at[:, i].set((a["codes"][:, i] + 5) % 32))
    ga, gb = np.asarray(forward(False)(params, a)["gen_logits"]), np.asarray(forward(False)(params, b)["gen_logits"])
    np.testing.assert_allclose(ga[0, :8 + i], gb[0, :8 + i], atol=1e-6)
    assert np.abs(ga[0, 8 + i:] - gb[0, 8 + i:]).max() > 1e-4
    np.testing.assert_allclose(ga[2], gb[2], atol=1e-6)  # row 2 has no code span


def test_mot_routing():
    model, params, _ = model_and_params(True)
    a = make_inputs()
    rng = np.random.default_rng(1)

    def perturb(tree, gen_weights: bool):
        """Noise on the LLM's generation-only weights (or on the text weights of its layers)."""
        def f(path, leaf):
            names = [str(getattr(k, "key", k)) for k in path]
            if names[0] != "llm" or any(n.endswith("_gen") for n in names) != gen_weights:
                return leaf
            if not gen_weights and names[1] != "layers":
                return leaf
            return leaf + 0.5 * jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)
        return jax.tree_util.tree_map_with_path(f, tree)

    gen_params = perturb(params, True)
    oa, ob = forward(True)(params, a), forward(True)(gen_params, a)
    gen = np.asarray(oa["gen_mask"])
    real = np.asarray(a["attn_mask"]) > 0
    for key in ("text_logits", "gen_logits"):
        da = np.abs(np.asarray(oa[key]) - np.asarray(ob[key])).max(-1)
        # Text positions before any generation token (and rows without one) ignore generation weights;
        # text after the span changes only through shared attention to the generation tokens.
        before = np.cumsum(gen, axis=1) == 0
        assert before[real].sum() > 20 and da[before & real].max() < 1e-6, key
        assert (da[gen] > 1e-4).all(), key  # every generation position (incl. <boi>) uses them
    # And the text weights do reach generation positions (shared attention + text context).
    text_params = perturb(params, False)
    oc = forward(True)(text_params, a)
    assert np.abs(np.asarray(oc["gen_logits"]) - np.asarray(oa["gen_logits"])).max(-1)[gen].min() > 1e-6


def test_remat_and_bf16_match():
    """Remat changes memory, not math (decoder grads match); bf16 compute keeps f32 params and logits."""
    from sgt_jax.models.llm import CausalLM

    model, params, _ = model_and_params(False)
    a = make_inputs()
    llm_params = {"llm": params["llm"]}

    def loss(remat, p):
        cfg = dataclasses.replace(model.cfg.llm, remat=remat)
        return jnp.mean(CausalLM(cfg).apply({"params": p}, a["tokens"], a["attn_mask"]) ** 2)

    g0 = jax.jit(jax.grad(functools.partial(loss, False)))(llm_params)
    g1 = jax.jit(jax.grad(functools.partial(loss, True)))(llm_params)
    for x, y in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    bf16 = umm_lib.UMM(tiny_config(False, compute_dtype="bfloat16", remat=True))
    o32, o16 = forward(False)(params, a), jax.jit(bf16.apply)({"params": params}, a)
    assert o16["text_logits"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    err = np.abs(_real(o32["text_logits"], a) - _real(o16["text_logits"], a)).max()
    assert err < 0.1 * np.abs(np.asarray(o32["text_logits"])).max()


def test_sharded_apply_matches_unsharded():
    """Logical names map through the config rules onto an 8-device mesh; sharded forward == plain."""
    model, params, boxed = model_and_params(True)
    cfg = config_lib.default_config()
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.mesh.axis_rules)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    assert shardings["llm"]["layers"]["attn"]["q"]["kernel"].spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None)
    assert shardings["llm"]["layers"]["mlp_gen"]["down"]["kernel"].spec == jax.sharding.PartitionSpec(
        None, "tensor", "fsdp")
    sharded = jax.tree_util.tree_map(jax.device_put, params, shardings)
    inputs = make_inputs()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda p, x: model.apply({"params": p}, x))(sharded, inputs)
    ref = forward(True)(params, inputs)
    np.testing.assert_allclose(np.asarray(out["text_logits"]), np.asarray(ref["text_logits"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["gen_logits"]), np.asarray(ref["gen_logits"]), atol=1e-5)


def test_dense_general_init_and_names():
    """The multi-axis kernels are created in their true shape with fan-in over all contracted axes."""
    from sgt_jax.models.layers import DenseGeneral

    layer = DenseGeneral((8,), ("heads", "kv", "embed"), in_dims=2, use_bias=True)
    variables = layer.init(jax.random.key(0), jnp.ones((2, 16, 32)))
    kernel = variables["params"]["kernel"]
    assert kernel.names == ("heads", "kv", "embed") and kernel.value.shape == (16, 32, 8)
    assert variables["params"]["bias"].names == ("embed",)
    std = float(np.std(np.asarray(kernel.value)))
    assert 0.7 / np.sqrt(16 * 32) < std < 1.2 / np.sqrt(16 * 32)
    y = layer.apply(variables, jnp.ones((2, 16, 32)))
    np.testing.assert_allclose(np.asarray(y[0]), np.asarray(kernel.value).sum((0, 1)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# KV cache: greedy cached decoding == uncached recomputation
# --------------------------------------------------------------------------------------------
PROMPT_LEN, STEPS, BOI = 9, 4, 3


def _prompt(seed=3):
    """Right-padded prompts of different lengths; rows 0 and 2 carry an understanding image."""
    lengths = np.array([9, 6, 7])
    inputs = make_inputs(seed, lengths=(16, 16, 16))
    tokens = np.asarray(inputs["tokens"])[:, :PROMPT_LEN].copy()
    tokens[np.arange(B), lengths - 1] = BOI  # the last prompt token is <boi> (used by the code test)
    mask = (np.arange(PROMPT_LEN)[None] < lengths[:, None]).astype(np.int32)
    return lengths, {"tokens": jnp.asarray(tokens), "attn_mask": jnp.asarray(mask),
                     "vit_images": inputs["vit_images"], "vit_start": jnp.asarray([1, -1, 2], jnp.int32)}


def _cached_decode(model, params, prompt, lengths, code_mode: bool):
    total = PROMPT_LEN + STEPS

    @jax.jit
    def run(params, prompt):
        inputs = dict(prompt)
        if code_mode:  # codes start right after each row's <boi>; <boi> is a generation token
            inputs["codes"] = jnp.zeros((B, 1), jnp.int32)
            inputs["gen_start"] = jnp.asarray(lengths, jnp.int32)
        cache = umm_lib.init_cache(model.cfg, B, total, jnp.float32)
        out, cache = model.apply({"params": params}, inputs, cache, method=umm_lib.UMM.prefill)
        key = "gen_logits" if code_mode else "text_logits"
        last = out[key]  # prefill gives the last real position's logits
        seq = jnp.zeros((B, STEPS), jnp.int32).at[:, 0].set(jnp.argmax(last, -1))
        logits = jnp.zeros((B, STEPS, last.shape[-1])).at[:, 0].set(last)
        flag = jnp.full((B,), int(code_mode), jnp.int32)

        def body(t, carry):
            seq, logits, cache = carry
            prev = seq[:, t - 1]
            step = {"tokens": prev, "codes": prev, "is_code": flag, "gen": flag}
            o, cache = model.apply({"params": params}, step, cache, method=umm_lib.UMM.decode_step)
            return seq.at[:, t].set(jnp.argmax(o[key], -1)), logits.at[:, t].set(o[key]), cache

        seq, logits, cache = jax.lax.fori_loop(1, STEPS, body, (seq, logits, cache))
        return seq, logits, cache["length"]

    return run(params, prompt)


def _uncached_decode(model, params, prompt, lengths, code_mode: bool):
    total = PROMPT_LEN + STEPS
    tokens = np.zeros((B, total), np.int32)
    tokens[:, :PROMPT_LEN] = np.asarray(prompt["tokens"])
    tokens[:, :PROMPT_LEN][np.asarray(prompt["attn_mask"]) == 0] = 0
    codes = np.zeros((B, STEPS), np.int32)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    seq, logits = np.zeros((B, STEPS), np.int32), []
    rows = np.arange(B)
    for t in range(STEPS):
        inputs = {"tokens": jnp.asarray(tokens),
                  "attn_mask": jnp.asarray((np.arange(total)[None] < (lengths + t)[:, None]).astype(np.int32)),
                  "vit_images": prompt["vit_images"], "vit_start": prompt["vit_start"]}
        if code_mode:
            inputs.update(codes=jnp.asarray(codes), gen_start=jnp.asarray(lengths, jnp.int32))
        out = fwd(params, inputs)
        step_logits = np.asarray(out["gen_logits" if code_mode else "text_logits"])[rows, lengths + t - 1]
        logits.append(step_logits)
        seq[:, t] = step_logits.argmax(-1)
        if code_mode:
            codes[:, t] = seq[:, t]
        else:
            tokens[rows, lengths + t] = seq[:, t]
    return seq, np.stack(logits, 1)


@pytest.mark.parametrize("mot", [False, True])
@pytest.mark.parametrize("code_mode", [False, True], ids=["text", "codes"])
def test_kv_cache_greedy_matches_uncached(mot, code_mode):
    model, params, _ = model_and_params(mot)
    lengths, prompt = _prompt()
    seq_c, logits_c, final_len = _cached_decode(model, params, prompt, lengths, code_mode)
    seq_u, logits_u = _uncached_decode(model, params, prompt, lengths, code_mode)
    np.testing.assert_allclose(np.asarray(logits_c), logits_u, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(seq_c), seq_u)
    np.testing.assert_array_equal(np.asarray(final_len), lengths + STEPS - 1)


def test_config_checks():
    """The UMM's rules (listed in sgt_jax/checks.py) fail by name for every stage, in any process
    (tests/test_config.py checks the import-order independence in fresh interpreters); the fields
    tied to the VQ are derived, so they cannot disagree with it."""
    cfg = config_lib.default_config()
    cfg.model.umm.codebook_size = 7
    with pytest.raises(config_lib.ConfigError, match="'model.umm.codebook_size' = 7.*derived"):
        checks.prepare(cfg)
    cfg = config_lib.default_config()
    cfg.data.image_size = 32
    assert checks.prepare(cfg).model.umm.num_codes == 16  # (32 / 8)^2, whatever the stage
    with pytest.raises(config_lib.ConfigError, match="finalized"):
        umm_lib.UMMConfig.from_config(config_lib.default_config())
    for stage in ("vq", "umm"):
        for path, value, match in (("llm.num_kv_heads", 3, "num_kv_heads"), ("vit.pos", "rope", "model.umm.vit.pos"),
                                   ("vit.patch_size", 7, "patch_size")):
            cfg = config_lib.default_config()
            cfg.stage = stage
            section, leaf = path.split(".")
            cfg.model.umm[section][leaf] = value
            with pytest.raises(config_lib.ConfigError, match=match):
                checks.prepare(cfg)
