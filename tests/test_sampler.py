"""Sampler tests on a tiny random UMM: cached decoding == uncached recomputation (codes with and
without CFG, text with eos), CFG scale 0 / 1 = unconditional / conditional logits, top-k / top-p
masks, per-seed determinism, one compile for the whole loop, prompts == training-row prefixes,
segmentation end to end, and restoring a checkpoint for sampling."""
from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax import checks
from sgt_jax import config as config_lib
from sgt_jax.data import render
from sgt_jax.data import sequences as seq
from sgt_jax.infer import prompts, sampler
from sgt_jax.models import umm as umm_lib
from sgt_jax.models import vq as vq_lib
from sgt_jax.train import restore

IMAGE, VIT, N, L_MAX = 32, 16, 16, 48  # 4x4 codes, 2x2 ViT tokens
PROMPTS = ["a red cube", "a blue ball left of the green cube", "two objects"]
GREEDY = sampler.SamplingConfig(guidance_scale=1.0, temperature=0.0)


def tiny_cfg():
    cfg = config_lib.default_config()
    cfg.stage = "umm"
    cfg.data.image_size = IMAGE
    cfg.data.answer_room = L_MAX - 3 - 4  # rows of L_MAX: 3 structural + 4 ViT tokens + the answer room
    cfg.model.vq.update(dict(downsample=8, codebook_size=32, width=16, depth=1, num_heads=2))
    u = cfg.model.umm
    u.llm.update(dict(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                      tied_embeddings=False))
    u.vit.update(dict(image_size=VIT, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32))
    u.update(dict(mot=True, gen_embed_dim=8, gen_adapter_dim=32, gen_head_dim=32, und_adapter_dim=32))
    checks.prepare(cfg)
    assert cfg.data.max_seq_len == L_MAX and cfg.model.umm.num_codes == N
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("a red green blue cube ball left of right the how many objects are there two three segment "
             "instances colour each one different for what shape is answer").split()
    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<img>", "</img>", "<boi>", "<eoi>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(words)) + ["(", ")", ".", ",", "?", ":"])}
    assert len(vocab) <= 64
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", additional_special_tokens=specials[4:])


@pytest.fixture(scope="module")
def builder(tokenizer):
    return seq.SequenceBuilder(seq.Layout.from_config(tiny_cfg()), seq.SpecialIds.from_tokenizer(tokenizer),
                               lambda s: tokenizer.encode(s, add_special_tokens=False))


def _random_params(abstract, seed):
    """Random values for a params tree (numpy, no XLA compile): fan-in scaled normals, unit norm scales."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        std = 0.02 if name == "bias" else 1.0 / np.sqrt(leaf.shape[0] if len(leaf.shape) > 1 else 1)
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def model_and_params():
    cfg = tiny_cfg()
    model = umm_lib.UMM(umm_lib.UMMConfig.from_config(cfg))
    vq = vq_lib.VQModel(vq_lib.spec_from_config(cfg), jnp.float32)
    params = _random_params(jax.eval_shape(lambda k: nn.meta.unbox(model.init(
        k, umm_lib.dummy_inputs(model.cfg, 1, L_MAX))["params"]), jax.random.key(0)), 0)
    vq_params = _random_params(jax.eval_shape(lambda k: nn.meta.unbox(vq_lib.init_params(vq, k)), jax.random.key(1)), 1)
    return model, params, vq, vq_params


def images(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _forward():
    model, _, _, _ = model_and_params()
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def _uncached_inputs(prefix, extra, codes=None):
    """Full-forward inputs: the prefix padded by `extra` slots, attended up to length + extra - 1.

    Every call has the same pytree and shapes (no image -> vit_start -1, no codes -> gen_start -1),
    so the reference forward compiles once."""
    tokens = np.pad(np.asarray(prefix["tokens"]), ((0, 0), (0, extra)))
    b, width = tokens.shape
    lengths = np.asarray(prefix["attn_mask"]).sum(1)
    mask = (np.arange(width)[None] < (lengths + extra - 1)[:, None]).astype(np.int32)
    has_img = "vit_images" in prefix
    return lengths, {
        "tokens": jnp.asarray(tokens), "attn_mask": jnp.asarray(mask),
        "vit_images": jnp.asarray(prefix["vit_images"]) if has_img else jnp.zeros((b, VIT, VIT, 3)),
        "vit_start": jnp.asarray(prefix["vit_start"]) if has_img else jnp.full((b,), -1, jnp.int32),
        "codes": jnp.asarray(np.zeros((b, N)) if codes is None else codes, jnp.int32),
        "gen_start": jnp.asarray(lengths if codes is not None else np.full(b, -1), jnp.int32)}


def uncached_code_logits(params, prefix, codes):
    """gen logits predicting each code of every row, from one full forward without a cache (causal:
    the logits for code t see only the prompt and codes < t)."""
    lengths, x = _uncached_inputs(prefix, N, codes)
    out = np.asarray(_forward()(params, x)["gen_logits"])
    return out[np.arange(len(lengths))[:, None], lengths[:, None] - 1 + np.arange(N)[None]]


def uncached_greedy_codes(params, cond, uncond=None, scale=1.0):
    """Greedy (optionally guided) codes by recomputation: one full forward per chosen code."""
    b = cond["tokens"].shape[0]
    codes = np.zeros((b, N), np.int32)
    logits = np.zeros((b, N, 32), np.float32)
    for t in range(N):
        g = uncached_code_logits(params, cond, codes)[:, t]
        if uncond is not None:
            g = np.asarray(sampler.guided_logits(g, uncached_code_logits(params, uncond, codes)[:, t], scale))
        logits[:, t] = g
        codes[:, t] = g.argmax(-1)
    return codes, logits


# --------------------------------------------------------------------------------------------
# KV cache equivalence and CFG
# --------------------------------------------------------------------------------------------
PAD_TO = 24  # every prefix batch below is padded to this width: one reference-forward compile
SEG_INSTRUCTIONS = ["segment each object , a different colour for each one .", "a", "what shape is the red cube ?"]


def test_cached_codes_match_uncached_greedy(builder):
    model, params, _, _ = model_and_params()
    prefix = prompts.proxy_prefixes(builder, images(), SEG_INSTRUCTIONS)
    assert len(set(prefix["attn_mask"].sum(1))) == 3  # three different prompt lengths in one batch
    assert prefix["tokens"].shape[1] == PAD_TO
    codes = sampler.generate_codes(model, params, prefix, N, GREEDY)
    ref_codes, _ = uncached_greedy_codes(params, prefix)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    assert codes.dtype == jnp.int32 and codes.shape == (3, N)
    assert len(np.unique(ref_codes)) > 3  # a real sequence, not one repeated code


def _t2i_pair(builder):
    return prompts.t2i_pair(builder, PROMPTS, length=PAD_TO)


def test_cfg_guided_decoding_and_scale_limits(builder):
    model, params, _, _ = model_and_params()
    cond, uncond = _t2i_pair(builder)
    # the unconditional row keeps <bos> and <boi>, replaces the prompt by pads of the same length
    np.testing.assert_array_equal(cond["attn_mask"], uncond["attn_mask"])
    ids = builder.ids
    n = cond["attn_mask"].sum(1)
    assert (uncond["tokens"][:, 0] == ids.bos).all() and (uncond["tokens"][np.arange(3), n - 1] == ids.boi).all()
    assert all((uncond["tokens"][i, 1:n[i] - 1] == ids.pad).all() for i in range(3))

    scale = 3.0
    codes, logits = sampler.generate_codes(model, params, cond, N, dataclasses.replace(GREEDY, guidance_scale=scale),
                                           uncond_prefix=uncond, return_logits=True)
    ref_codes, ref_logits = uncached_greedy_codes(params, cond, uncond, scale)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)

    # With the codes fixed, the guided logits are the uncond logits at scale 0, the cond ones at 1.
    for s, which in ((0.0, uncond), (1.0, cond)):
        _, got = sampler.generate_codes(model, params, cond, N, dataclasses.replace(GREEDY, guidance_scale=s),
                                        uncond_prefix=uncond, return_logits=True)
        want = uncached_code_logits(params, which, np.asarray(got).argmax(-1))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)
    # and the two really differ (the prompt matters), so the checks above can fail
    c, u = (uncached_code_logits(params, p, ref_codes) for p in (cond, uncond))
    assert np.abs(c - u).max() > 1e-2


def test_cached_text_matches_uncached_greedy_and_stops_at_eos(builder):
    model, params, _, _ = model_and_params()
    prefix = prompts.vqa_prefixes(builder, images(), ["how many objects are there ?", "what shape ?", "a"],
                                  length=PAD_TO)
    steps, rows = 6, np.arange(3)
    lengths, x = _uncached_inputs(prefix, N)
    tokens = np.asarray(x["tokens"]).copy()
    ref, first_logits = np.zeros((3, steps), np.int32), None
    for t in range(steps):  # uncached greedy without eos; the causal mask hides the unwritten tail
        out = _forward()(params, dict(x, tokens=jnp.asarray(tokens)))
        logits = np.asarray(out["text_logits"])[rows, lengths + t - 1]
        first_logits = logits if first_logits is None else first_logits
        ref[:, t] = logits.argmax(-1)
        tokens[rows, lengths + t] = ref[:, t]
    no_stop = sampler.generate_text(model, params, prefix, steps, eos_id=-1, sampling=GREEDY)
    np.testing.assert_array_equal(np.asarray(no_stop), ref)
    # Pick an eos that row 0 emits at step 2: row 0 stops there, later slots are padding.
    eos = int(ref[0, 2])
    got = np.asarray(sampler.generate_text(model, params, prefix, steps, eos_id=eos, sampling=GREEDY, pad_id=0))
    for r in range(3):
        hits = np.flatnonzero(ref[r] == eos)
        stop = hits[0] + 1 if len(hits) else steps
        np.testing.assert_array_equal(got[r, :stop], ref[r, :stop])
        assert (got[r, stop:] == 0).all()
    assert sampler.text_lengths(got, eos)[0] == np.flatnonzero(ref[0] == eos)[0] + 1
    # Sampled text (same compiled loop): reproducible per seed, first token inside the top-k.
    def sampled(seed):
        return np.asarray(sampler.generate_text(model, params, prefix, steps, eos_id=-1, sampling=sampler.SamplingConfig(
            temperature=1.0, top_k=3, seed=seed)))
    s1, s2 = sampled(1), sampled(2)
    np.testing.assert_array_equal(s1, sampled(1))
    assert (s1 != s2).any()
    top3 = np.argsort(-first_logits, axis=-1)[:, :3]
    assert all(s[r, 0] in top3[r] for s in (s1, s2) for r in range(3))


# --------------------------------------------------------------------------------------------
# sampling rules
# --------------------------------------------------------------------------------------------
def test_top_k_top_p_masks():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    filt = jax.jit(sampler.filter_logits)
    kept = lambda k, p: np.isfinite(np.asarray(filt(logits, k, p)))
    np.testing.assert_array_equal(kept(0, 1.0), True)
    np.testing.assert_array_equal(kept(2, 1.0)[0], [False, True, False, True])
    np.testing.assert_array_equal(kept(0, 0.7)[0], [False, True, False, True])  # 0.5 < 0.7 <= 0.8
    np.testing.assert_array_equal(kept(0, 0.5)[0], [False, True, False, False])  # mass before 2nd = 0.5
    np.testing.assert_array_equal(kept(0, 0.81)[0], [False, True, True, True])
    np.testing.assert_array_equal(kept(3, 0.95)[0], [False, True, True, True])  # k cuts first
    np.testing.assert_array_equal(kept(1, 1.0)[1], True)  # ties with the threshold are kept
    kept_vals = np.asarray(filt(logits, 2, 1.0))[0]
    np.testing.assert_allclose(kept_vals[[1, 3]], np.asarray(logits)[0, [1, 3]])
    # Draws respect the masks and cover what is kept.
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.jit(jax.vmap(lambda k, tk, tp: sampler.sample_logits(logits[:1], k, 1.0, tk, tp)[0], (0, None, None)))
    assert set(np.asarray(draw(keys, 2, 1.0)).tolist()) == {1, 3}
    assert set(np.asarray(draw(keys, 0, 0.5)).tolist()) == {1}
    assert set(np.asarray(draw(keys, 0, 1.0)).tolist()) == {0, 1, 2, 3}
    # temperature 0 is argmax whatever the filters say
    assert int(sampler.sample_logits(logits, jax.random.key(1), 0.0, 0, 1.0)[0]) == 1


def test_seed_determinism_and_single_compile(builder):
    model, params, _, _ = model_and_params()
    cond, uncond = _t2i_pair(builder)
    run = functools.partial(sampler.generate_codes, model, params, cond, N, uncond_prefix=uncond, return_logits=True)
    a = run(sampler.SamplingConfig(seed=1))[0]
    b = run(sampler.SamplingConfig(seed=1))[0]
    c = run(sampler.SamplingConfig(seed=2, guidance_scale=2.0, temperature=0.7, top_k=5, top_p=0.9))[0]
    d = run(sampler.SamplingConfig(seed=7), rng=jax.random.key(1))[0]  # an explicit rng wins over the seed
    e = run(sampler.SamplingConfig(seed=3))[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d))
    assert (np.asarray(a) != np.asarray(c)).any()
    assert (np.asarray(a) != np.asarray(e)).mean() > 0.5  # 48 codes: the seed really matters
    # New knobs and seeds reuse the one compiled program ...
    fn = sampler._codes_fn(model, N, True, True)
    if hasattr(fn, "_cache_size"):  # private jax API: skip where a future version drops it
        assert fn._cache_size() == 1

    # ... in which the decode step is traced once for all N codes (a lax loop, not a Python one).
    counts = {"decode": 0, "prefill": 0}

    class CountingUMM(umm_lib.UMM):
        def decode_step(self, step, cache):
            counts["decode"] += 1
            return super().decode_step(step, cache)

        def prefill(self, inputs, cache):
            counts["prefill"] += 1
            return super().prefill(inputs, cache)

    counting = CountingUMM(model.cfg)
    shapes = jax.eval_shape(lambda: sampler.generate_codes(counting, params, cond, N, uncond_prefix=uncond))
    assert shapes.shape == (3, N) and counts == {"decode": 1, "prefill": 1}
    jax.eval_shape(lambda: sampler.generate_text(counting, params, cond, 5, eos_id=3))
    assert counts == {"decode": 2, "prefill": 2}


# --------------------------------------------------------------------------------------------
# prompts, images and segmentation
# --------------------------------------------------------------------------------------------
def test_prompts_are_training_row_prefixes(builder):
    img = images(2)
    target = images(1, seed=5)[0]
    t2i = prompts.t2i_prefixes(builder, PROMPTS[:1])
    row = builder.text_to_image(PROMPTS[0], target, drop=False)
    n = int(t2i["attn_mask"].sum())
    assert n == int(row["gen_start"]) and t2i["tokens"].shape[1] % 8 == 0
    np.testing.assert_array_equal(t2i["tokens"][0, :n], row["tokens"][:n])
    dropped = builder.text_to_image(PROMPTS[0], target, drop=True)
    np.testing.assert_array_equal(prompts.t2i_pair(builder, PROMPTS[:1])[1]["tokens"][0, :n], dropped["tokens"][:n])

    ins = "segment each object"
    for cond in (True, False):
        px = prompts.proxy_prefixes(builder, img, ins, cond=cond)
        row = builder.proxy("segmentation", img[1], ins, target, drop=not cond)
        n = int(px["attn_mask"][1].sum())
        assert n == int(row["gen_start"]) and int(px["vit_start"][1]) == int(row["vit_start"])
        np.testing.assert_array_equal(px["tokens"][1, :n], row["tokens"][:n])
        np.testing.assert_allclose(px["vit_images"][1], row["vit_image"])  # the image is never dropped

    q = "how many objects are there ?"
    vqa = prompts.vqa_prefixes(builder, img[:1], q)
    row = builder.understanding(img[0], q, "two")
    n = int(vqa["attn_mask"].sum())
    np.testing.assert_array_equal(vqa["tokens"][0, :n], row["tokens"][:n])
    assert row["text_loss_weight"][n - 1] > 0 and row["text_loss_weight"][n - 2] == 0  # answer starts at n
    # over-long questions keep their tail, leaving room for the answer
    long = prompts.vqa_prefixes(builder, img[:1], "a " * 60 + "how many ?", answer_room=4)
    assert long["attn_mask"].sum() == L_MAX - 4 and long["tokens"][0, L_MAX - 5] == builder.encode("?")[0]


def test_generate_images_and_segment(builder):
    model, params, vq, vq_params = model_and_params()
    img = images(3)
    maps, rgb = sampler.segment(model, params, vq, vq_params, builder, img, return_rgb=True)  # greedy, no CFG
    assert maps.shape == (3, IMAGE, IMAGE) and maps.dtype == np.uint8
    assert rgb.shape == (3, IMAGE, IMAGE, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(maps, render.rgb_to_instance(rgb))
    # the same pipeline spelled out: default instruction -> codes -> VQ decode -> nearest palette colour
    prefix = prompts.proxy_prefixes(builder, img, prompts.default_instruction("segmentation"))
    codes = sampler.generate_codes(model, params, prefix, N, GREEDY)
    decoded = vq_lib.decode(vq, vq_params, jnp.asarray(codes).reshape(3, 4, 4))
    want = np.clip(np.round((np.asarray(decoded) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(rgb, want, atol=1)  # jit vs eager float rounding may move a value by one
    assert len(np.unique(want)) > 10  # a real decoded image, not a constant
    # semantic maps decode with the semantic palette
    sem = sampler.segment(model, params, vq, vq_params, builder, img, proxy="semantic")
    assert sem.shape == (3, IMAGE, IMAGE) and sem.max() < len(render.SEMANTIC_PALETTE)


# --------------------------------------------------------------------------------------------
# restoring a run for sampling
# --------------------------------------------------------------------------------------------
def save_tiny_run(workdir, step=7):
    """A UMM-stage checkpoint as the training loop writes it (state + metadata with the config)."""
    from sgt_jax.train import checkpoint as ckpt_lib
    from sgt_jax.train.state import TrainState

    cfg = tiny_cfg()
    _, params, _, vq_params = model_and_params()
    ema = jax.tree.map(lambda x: x + 1.0, params)  # distinguishable from params
    state = TrainState(step=jnp.int32(step), params={"umm": params, "vq": vq_params}, model_state={},
                       opt_state={"count": jnp.int32(step)}, ema_params={"umm": ema, "vq": vq_params},
                       consecutive_skips=jnp.int32(0), total_skips=jnp.int32(0))
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(step, state, metadata={"config": cfg.to_json_best_effort(), "stage": "umm"}, force=True)
    ckpt.close()
    return cfg, params, ema, vq_params


def test_load_umm_restores_ema_params_vq_and_config(tmp_path):
    cfg, params, ema, vq_params = save_tiny_run(str(tmp_path))
    loaded = restore.load_umm(str(tmp_path))
    assert loaded.step == 7
    assert loaded.model.cfg == umm_lib.UMMConfig.from_config(cfg)  # rebuilt from the saved config
    assert loaded.vq_model.spec == vq_lib.spec_from_config(cfg)
    for got, want in ((loaded.params, ema), (loaded.vq_params, vq_params)):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    raw = restore.load_umm(str(tmp_path), use_ema=False, cfg=cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), raw.params, params)


def test_exported_params_load_as_a_run_and_as_init_from(tmp_path, load_tool):
    """tools/export_params.py: the params-only float16 export restores as a run (its saved config,
    EMA params, the VQ) and fills a target through init_from, each value the float16 rounding of the
    source; a second export into the same directory is refused."""
    from sgt_jax.train import checkpoint as ckpt_lib

    cfg, params, ema, vq_params = save_tiny_run(str(tmp_path / "run"))
    tool = load_tool("export_params")
    meta = tool.export(str(tmp_path / "run"), str(tmp_path / "export"))
    assert meta["exported"]["source_params"] == "ema_params" and meta["step"] == 7
    loaded = restore.load_umm(str(tmp_path / "export"))
    assert loaded.step == 7 and loaded.model.cfg == umm_lib.UMMConfig.from_config(cfg)

    def f16(x):
        return np.asarray(np.asarray(x, np.float16), np.float32)

    for got, want in ((loaded.params, ema), (loaded.vq_params, vq_params)):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), f16(b)), got, want)
    assert jax.tree.leaves(loaded.params)[0].dtype == np.float32
    target = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), {"umm": params, "vq": vq_params})
    filled, paths = ckpt_lib.load_params(str(tmp_path / "export"), target)
    assert len(paths) == len(jax.tree.leaves(target))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), f16(b)), filled["umm"], ema)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        tool.export(str(tmp_path / "run"), str(tmp_path / "export"))
