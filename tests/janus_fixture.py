"""Tiny random Janus checkpoints for the converter tests, in both on-disk layouts.

`make_hf(dir)` saves a float32 transformers `JanusForConditionalGeneration` built from a tiny config
plus a tiny byte-level BPE tokenizer carrying Janus's special tokens; `make_original(hf_dir, dir)`
rewrites it in the DeepSeek release layout through the converter's inverse key map (timm's fused qkv
included). The LlamaGen codebook is l2-normalised in the fixture, as in the published VQ-16 weights:
transformers' quantiser takes the nearest *unnormalised* code, LlamaGen's (and ours) the nearest
normalised one; on a normalised codebook the two are the same code.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

JANUS_SPECIALS = {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "pad": "<｜▁pad▁｜>"}
IMAGE_TOKENS = ["<image_placeholder>", "<begin_of_image>", "<end_of_image>"]

# Same family as Janus-Pro, tiny: the shapes of `configs/umm_1b.py:smoke`. Vision and VQ grids agree
# (32 px / 8 = 4 x 4 = 16 tokens each).
TINY = dict(vocab=1024, width=64, depth=2, heads=4, mlp=96, vit_width=32, vit_depth=2, vit_heads=2, image=32,
            patch=8, vq_width=32, vq_mult=(1, 1, 2, 2), vq_res=1, z=32, codebook=64, code_dim=8)


def make_tokenizer(out_dir: Path):
    """A byte-level BPE whose vocab holds Janus's special tokens (ids come from the tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sgt_jax.data import shapes_world, text

    texts = list(text.corpus(shapes_world.WorldConfig(image_size=32), 40)) + ["<|User|>: <|Assistant|>: \n\n"] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = list(JANUS_SPECIALS.values()) + IMAGE_TOKENS
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=TINY["vocab"] - 8, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=JANUS_SPECIALS["bos"],
                                   eos_token=JANUS_SPECIALS["eos"], pad_token=JANUS_SPECIALS["pad"],
                                   extra_special_tokens=IMAGE_TOKENS)
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(tokenizer, **over):
    from transformers import JanusConfig

    t = dict(TINY, **over)
    grid = t["image"] // t["patch"]
    vocab = tokenizer.get_vocab()
    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=t["vocab"], hidden_size=t["width"],
                         intermediate_size=t["mlp"], num_hidden_layers=t["depth"], num_attention_heads=t["heads"],
                         num_key_value_heads=t["heads"], rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=vocab[JANUS_SPECIALS["pad"]]),
        vision_config=dict(hidden_size=t["vit_width"], num_hidden_layers=t["vit_depth"],
                           num_attention_heads=t["vit_heads"], image_size=t["image"], patch_size=t["patch"],
                           mlp_ratio=2.0, projection_dim=t["width"], depth=2, num_image_tokens=grid * grid),
        vq_config=dict(embed_dim=t["code_dim"], num_embeddings=t["codebook"], latent_channels=t["z"],
                       base_channels=t["vq_width"], channel_multiplier=list(t["vq_mult"]), num_res_blocks=t["vq_res"],
                       projection_dim=t["width"], image_token_embed_dim=t["width"]),
        image_token_id=vocab["<image_placeholder>"], tie_word_embeddings=False)


def make_hf(out_dir: Path, seed: int = 0, **over):
    """Save a tiny random Janus (float32, safetensors) + tokenizer to out_dir; returns (model, tokenizer)."""
    import torch
    from transformers import JanusForConditionalGeneration

    out_dir = Path(out_dir)
    tok = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(tiny_config(tok, **over)).eval()
    with torch.no_grad():  # random weights with some spread, so the checks are not trivially near zero
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.normal_(0.0, 1.0 / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
        e = model.model.vqmodel.quantize.embedding.weight
        e.copy_(torch.nn.functional.normalize(e, dim=-1))
    model.save_pretrained(out_dir)
    return model, tok


def make_original(hf_dir: Path, out_dir: Path, *, shards: int = 1, dtype=None) -> Path:
    """Rewrite an hf-layout fixture in the original DeepSeek layout (bin or shards + index)."""
    import torch
    from safetensors.torch import load_file

    from sgt_jax.convert import janus

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    orig = janus.to_original_state(state)
    orig["gen_vision_model.quantize.codebook_used"] = torch.zeros(orig["gen_vision_model.quantize.embedding.weight"].shape[0])
    orig["vision_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, 4)
    if dtype is not None:
        orig = {k: v.to(dtype) for k, v in orig.items()}
    keys = sorted(orig)
    if shards == 1:
        torch.save(orig, out_dir / "pytorch_model.bin")
    else:
        weight_map = {}
        for i in range(shards):
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            part = {k: orig[k] for k in keys[i::shards]}
            torch.save(part, out_dir / name)
            weight_map.update({k: name for k in part})
        (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf = json.loads((hf_dir / "config.json").read_text())
    v, t = hf["vision_config"], hf["text_config"]
    config = {
        "model_type": "multi_modality",
        "language_config": {k: t[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_hidden_layers", "num_key_value_heads", "vocab_size",
                                              "rms_norm_eps", "model_type")},
        "vision_config": {"cls": "CLIPVisionTower", "params": {
            "model_name": "tiny_siglip", "image_size": v["image_size"], "select_feature": "same", "select_layer": -1,
            "width": v["hidden_size"], "layers": v["num_hidden_layers"], "heads": v["num_attention_heads"],
            "patch_size": v["patch_size"], "mlp_ratio": v["mlp_ratio"]}},
        "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": hf["vq_config"]["num_embeddings"],
                                                         "n_embed": hf["vq_config"]["embed_dim"]}},
        "gen_aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "params": {}},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    for f in hf_dir.iterdir():  # the release ships its tokenizer beside the weights
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir
