"""Janus-Pro import: parity against transformers' `JanusForConditionalGeneration` on a tiny random
model at float32 (understanding logits, generation-head logits, VQ codes and decode, both on-disk
layouts, greedy CFG image generation and greedy answers through our sampler)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import janus_fixture as jf  # noqa: E402

from sgt_jax.convert import janus  # noqa: E402
from sgt_jax.infer import prompts, sampler  # noqa: E402
from sgt_jax.models import umm as umm_lib  # noqa: E402
from sgt_jax.models import vq as vq_lib  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("janus")
    model, tok = jf.make_hf(root / "hf")
    tree, cfg, spec, _ = janus.read(root / "hf")
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float32)), tree)
    return dict(root=root, hf=model, tok=tok, cfg=cfg, spec=spec, params=params, ids=janus.special_ids(tok))


def _np(t):
    return t.detach().float().numpy()


def _close(ours, ref, rtol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _hf_pixels(images_uint8):  # [-1, 1] NCHW (mean = std = 0.5)
    x = images_uint8.astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def test_understanding_logits(tiny):
    cfg, ids, tok = tiny["cfg"], tiny["ids"], tiny["tok"]
    images = _images(2, cfg.vit.image_size)
    batch = prompts.janus_understanding(tok, ids, images, ["How many shapes?", "Which colour is the star?"],
                                        cfg.num_vit_tokens)
    model = umm_lib.UMM(cfg)
    ours = model.apply({"params": tiny["params"]["umm"]}, {k: jnp.asarray(v) for k, v in batch.items()})
    with torch.no_grad():
        ref = tiny["hf"](input_ids=torch.from_numpy(batch["tokens"]).long(), pixel_values=_hf_pixels(images),
                         attention_mask=torch.from_numpy(batch["attn_mask"]).long()).logits
    mask = batch["attn_mask"] > 0
    _close(np.asarray(ours["text_logits"])[mask], _np(ref)[mask])


def test_gen_head_logits_at_code_positions(tiny):
    cfg, ids, tok, hf = tiny["cfg"], tiny["ids"], tiny["tok"], tiny["hf"]
    cond, _ = prompts.janus_generation(tok, ids, ["a red circle left of a blue square"])
    prefix = cond["tokens"][0][: cond["attn_mask"][0].sum()]
    codes = np.random.default_rng(1).integers(0, cfg.codebook_size, (1, cfg.num_codes))
    n = len(prefix)
    tokens = np.concatenate([prefix, np.full(cfg.num_codes, ids["pad"])])[None].astype(np.int32)
    inputs = {"tokens": tokens, "attn_mask": np.ones_like(tokens), "codes": codes.astype(np.int32),
              "gen_start": np.array([n], np.int32)}
    ours = umm_lib.UMM(cfg).apply({"params": tiny["params"]["umm"]}, {k: jnp.asarray(v) for k, v in inputs.items()})
    with torch.no_grad():
        text = hf.get_input_embeddings()(torch.from_numpy(prefix[None]).long())
        img = hf.prepare_embeddings_for_image_generation(torch.from_numpy(codes).long())
        h = hf.model.language_model(inputs_embeds=torch.cat([text, img], 1)).last_hidden_state
        ref = hf.model.generation_head(h)
    span = slice(n - 1, n - 1 + cfg.num_codes)  # <boi> .. second-to-last code predict the codes
    _close(np.asarray(ours["gen_logits"])[0, span], _np(ref)[0, span])


def _shapes_world_images(n, size):
    from sgt_jax.data import shapes_world

    world = shapes_world.WorldConfig(image_size=size)
    return np.stack([shapes_world.generate_scene(i, world, "train")["image"] for i in range(n)])


@pytest.mark.parametrize("source", ["random", "shapes_world"])
def test_vq_codes_identical_and_decode_close(tiny, source):
    spec, hf = tiny["spec"], tiny["hf"]
    images = _images(3, spec.image_size, seed=2) if source == "random" else _shapes_world_images(3, spec.image_size)
    vq = vq_lib.VQModel(spec)
    x = images.astype(np.float32) / 127.5 - 1.0
    ours = np.asarray(vq_lib.encode(vq, tiny["params"]["vq"], jnp.asarray(x))).reshape(3, -1)
    with torch.no_grad():
        ref = hf.model.vqmodel.encode(_hf_pixels(images)).image_tokens.view(3, -1).numpy()
        ref_img = hf.model.vqmodel.decode(torch.from_numpy(ref))
    np.testing.assert_array_equal(ours, ref)
    dec = vq_lib.decode(vq, tiny["params"]["vq"], jnp.asarray(ref.reshape(3, spec.grid, spec.grid)))
    _close(np.asarray(dec), _np(ref_img.permute(0, 2, 3, 1)))


@pytest.mark.parametrize("shards", [1, 3])
def test_original_layout_converts_to_same_params(tiny, shards):
    orig = jf.make_original(tiny["root"] / "hf", tiny["root"] / f"orig{shards}", shards=shards)
    tree, cfg, spec, src = janus.read(orig)
    assert src.layout == "original" and cfg == tiny["cfg"] and spec == tiny["spec"]
    flat_a = jax.tree_util.tree_flatten_with_path(tiny["params"])[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    assert len(flat_a) == len(flat_b)
    for path, a in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[path], np.float32), np.asarray(a), err_msg=str(path))


def test_convert_writes_checkpoint_tokenizer_and_manifest(tiny, tmp_path):
    orig = jf.make_original(tiny["root"] / "hf", tmp_path / "orig", dtype=torch.bfloat16)
    man = janus.convert(orig, tmp_path / "out", dtype="bf16")
    assert man["layout"] == "original" and man["dtype"] == "bf16"
    assert set(man["skipped"]) == {"gen_vision_model.quantize.codebook_used", "vision_model.vision_tower.attn_pool.latent"}
    assert sorted(man["mapping"]["vision_model.vision_tower.blocks.0.attn.qkv.weight"]) == [
        "umm/vit/blocks/k/kernel[0]", "umm/vit/blocks/q/kernel[0]", "umm/vit/blocks/v/kernel[0]"]
    assert man["mapping"]["gen_embed.weight"] == ["umm/code_embed/embedding"]
    assert man["special_ids"] == tiny["ids"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_params"] == man["num_params"]
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "checkpoints" / "0" / "state").exists()
    with pytest.raises(ValueError, match="--dtype"):
        janus.convert(orig, tmp_path / "bad", dtype="fp8")
    assert not (tmp_path / "bad").exists()


def test_greedy_cfg_image_generation_matches_transformers(tiny):
    cfg, ids, tok, hf = tiny["cfg"], tiny["ids"], tiny["tok"], tiny["hf"]
    texts = ["a red circle", "two blue squares above a green star", "a small yellow heart on the left"]
    cond, uncond = prompts.janus_generation(tok, ids, texts)
    scale = 3.0
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(do_sample=False, guidance_scale=scale, bos_token_id=ids["bos"], pad_token_id=ids["pad"],
                               eos_token_id=ids["eos"], generation_kwargs={"boi_token_id": ids["boi"]})
    ours = sampler.generate_codes(umm_lib.UMM(cfg), tiny["params"]["umm"], cond, cfg.num_codes,
                                  sampler.SamplingConfig(guidance_scale=scale, temperature=0.0), uncond_prefix=uncond)
    for i in range(len(texts)):
        row = cond["tokens"][i][: cond["attn_mask"][i].sum()]
        with torch.no_grad():
            ref = hf.generate(torch.from_numpy(row[None]).long(), attention_mask=torch.ones(1, len(row)).long(),
                              generation_mode="image", generation_config=gen_cfg)
        np.testing.assert_array_equal(np.asarray(ours)[i], ref[0].numpy())
    assert len(np.unique(np.asarray(ours))) > 1  # a real sequence, not one repeated code


def test_greedy_understanding_answer_matches_transformers(tiny):
    cfg, ids, tok, hf = tiny["cfg"], tiny["ids"], tiny["tok"], tiny["hf"]
    images = _images(2, cfg.vit.image_size, seed=5)
    questions = ["What is in the image?", "Is the circle left of the square?"]
    batch = prompts.janus_understanding(tok, ids, images, questions, cfg.num_vit_tokens)
    n_new = 8
    ours = np.asarray(sampler.generate_text(umm_lib.UMM(cfg), tiny["params"]["umm"], batch, n_new, ids["eos"]))
    for i in range(2):
        row = batch["tokens"][i][: batch["attn_mask"][i].sum()]
        with torch.no_grad():
            ref = hf.generate(torch.from_numpy(row[None]).long(), pixel_values=_hf_pixels(images[i:i + 1]),
                              attention_mask=torch.ones(1, len(row)).long(), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=ids["eos"], pad_token_id=ids["pad"])[0, len(row):].numpy()
        np.testing.assert_array_equal(ours[i, :len(ref)], ref)


@pytest.mark.parametrize("hw", [(20, 48), (60, 30), (32, 32)])
def test_janus_image_preprocessing_matches_transformers(hw):
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    image = _images(1, max(hw), seed=7)[0][: hw[0], : hw[1]]
    proc = JanusImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref = proc(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = prompts.janus_pixels(image, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    if hw[0] != hw[1]:  # padded on the reference background (127 / 127.5 - 1)
        assert np.isclose(ours[0, 0], 127 / 127.5 - 1).all() or np.isclose(ours[-1, -1], 127 / 127.5 - 1).all()
