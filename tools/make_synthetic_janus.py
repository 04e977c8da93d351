"""Write a synthetic Janus-Pro-shaped checkpoint in the original DeepSeek layout (random weights).

    python tools/make_synthetic_janus.py --out=/tmp/janus_1b_synth [--size=1b|7b|tiny] [--shards=1]

Why: to measure the converter's peak host memory at real size without downloading anything
(`/usr/bin/time -v python tools/convert_checkpoint.py --janus=/tmp/janus_1b_synth --out=...`). The
tensors are bf16 noise with the exact names and shapes of the release (fused timm qkv, LlamaGen VQ-16,
`attn_pool.*` and `codebook_used` included), written tensor by tensor per shard; a tiny byte-level
tokenizer with Janus's special tokens goes beside them. 1B is ~4 GB on disk: delete it afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

SIZES = {  # LLM (width, depth, mlp, vocab), SigLIP-L/16 @ 384, LlamaGen VQ-16
    "1b": dict(width=2048, depth=24, mlp=5632, vocab=102400),
    "7b": dict(width=4096, depth=30, mlp=11008, vocab=102400),
    "tiny": dict(width=64, depth=2, mlp=96, vocab=1024),
}


def shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Original-layout tensor name -> shape of a Janus-Pro of that size."""
    s = SIZES[size]
    d, v = s["width"], s["vocab"]
    real = size != "tiny"
    vit_w, vit_depth, patch, img = (1024, 24, 16, 384) if real else (32, 2, 8, 32)
    ch, mult, res, z, codes = (128, (1, 1, 2, 2, 4), 2, 256, 16384) if real else (32, (1, 1, 2, 2), 1, 32, 64)
    out: dict[str, tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (v, d),
                                       "language_model.model.norm.weight": (d,), "language_model.lm_head.weight": (v, d)}
    for i in range(s["depth"]):
        p = f"language_model.model.layers.{i}."
        out.update({p + f"self_attn.{n}_proj.weight": (d, d) for n in "qkvo"})
        out.update({p + "mlp.gate_proj.weight": (s["mlp"], d), p + "mlp.up_proj.weight": (s["mlp"], d),
                    p + "mlp.down_proj.weight": (d, s["mlp"]), p + "input_layernorm.weight": (d,),
                    p + "post_attention_layernorm.weight": (d,)})
    t = "vision_model.vision_tower."
    n_tok = (img // patch) ** 2
    out.update({t + "patch_embed.proj.weight": (vit_w, 3, patch, patch), t + "patch_embed.proj.bias": (vit_w,),
                t + "pos_embed": (1, n_tok, vit_w), t + "norm.weight": (vit_w,), t + "norm.bias": (vit_w,),
                t + "attn_pool.latent": (1, 1, vit_w), t + "attn_pool.q.weight": (vit_w, vit_w)})
    for i in range(vit_depth):
        p = f"{t}blocks.{i}."
        out.update({p + "norm1.weight": (vit_w,), p + "norm1.bias": (vit_w,), p + "norm2.weight": (vit_w,),
                    p + "norm2.bias": (vit_w,), p + "attn.qkv.weight": (3 * vit_w, vit_w), p + "attn.qkv.bias": (3 * vit_w,),
                    p + "attn.proj.weight": (vit_w, vit_w), p + "attn.proj.bias": (vit_w,),
                    p + "mlp.fc1.weight": (4 * vit_w, vit_w), p + "mlp.fc1.bias": (4 * vit_w,),
                    p + "mlp.fc2.weight": (vit_w, 4 * vit_w), p + "mlp.fc2.bias": (vit_w,)})
    for name, (i, o) in {"aligner": (vit_w, d), "gen_aligner": (8, d)}.items():
        out.update({f"{name}.layers.0.weight": (d, i), f"{name}.layers.0.bias": (d,),
                    f"{name}.layers.2.weight": (o, d), f"{name}.layers.2.bias": (o,)})
    out.update({"gen_head.output_mlp_projector.weight": (d, d), "gen_head.output_mlp_projector.bias": (d,),
                "gen_head.vision_head.weight": (codes, d), "gen_head.vision_head.bias": (codes,),
                "gen_embed.weight": (codes, 8)})
    out.update(_vq_shapes(ch, mult, res, z, codes))
    return out


def _vq_shapes(ch, mult, res, z, codes):
    out: dict[str, tuple[int, ...]] = {}
    g = "gen_vision_model."

    def conv(name, cin, cout, k):
        out[name + ".weight"], out[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[name + ".weight"], out[name + ".bias"] = (c,), (c,)

    def resblock(p, cin, cout):
        norm(p + "norm1", cin), conv(p + "conv1", cin, cout, 3), norm(p + "norm2", cout), conv(p + "conv2", cout, cout, 3)
        if cin != cout:
            conv(p + "nin_shortcut", cin, cout, 1)

    def attn(p, c):
        norm(p + "norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(p + n, c, c, 1)

    def mid(p, c):
        resblock(p + "0.", c, c), attn(p + "1.", c), resblock(p + "2.", c, c)

    e, d, levels = g + "encoder.", g + "decoder.", len(mult)
    conv(e + "conv_in", 3, ch, 3)
    cin = ch
    for lv, m in enumerate(mult):
        for i in range(res):
            resblock(f"{e}conv_blocks.{lv}.res.{i}.", cin, ch * m)
            cin = ch * m
            if lv == levels - 1:
                attn(f"{e}conv_blocks.{lv}.attn.{i}.", cin)
        if lv != levels - 1:
            conv(f"{e}conv_blocks.{lv}.downsample.conv", cin, cin, 3)
    mid(e + "mid.", cin), norm(e + "norm_out", cin), conv(e + "conv_out", cin, z, 3)
    conv(g + "quant_conv", z, 8, 1), conv(g + "post_quant_conv", 8, z, 1)
    out[g + "quantize.embedding.weight"], out[g + "quantize.codebook_used"] = (codes, 8), (codes,)
    cin = ch * mult[-1]
    conv(d + "conv_in", z, cin, 3), mid(d + "mid.", cin)
    for lv, m in enumerate(mult[::-1]):
        for i in range(res + 1):
            resblock(f"{d}conv_blocks.{lv}.res.{i}.", cin, ch * m)
            cin = ch * m
            if lv == 0:
                attn(f"{d}conv_blocks.{lv}.attn.{i}.", cin)
        if lv != levels - 1:
            conv(f"{d}conv_blocks.{lv}.upsample.conv", cin, cin, 3)
    norm(d + "norm_out", cin), conv(d + "conv_out", cin, 3, 3)
    return out


def config_json(size: str) -> dict:
    s = SIZES[size]
    real = size != "tiny"
    vision = ({"model_name": "siglip_large_patch16_384", "image_size": 384} if real else
              {"model_name": "tiny", "image_size": 32, "width": 32, "layers": 2, "heads": 2, "patch_size": 8,
               "mlp_ratio": 4.0})
    return {"model_type": "multi_modality",
            "language_config": {"model_type": "llama", "hidden_size": s["width"], "num_hidden_layers": s["depth"],
                                "intermediate_size": s["mlp"], "num_attention_heads": 16 if real else 4,
                                "num_key_value_heads": 16 if real else 4, "vocab_size": s["vocab"]},
            "vision_config": {"cls": "CLIPVisionTower", "params": dict(vision, select_feature="same", select_layer=-1)},
            "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "projector_type": "mlp_gelu"}},
            "gen_aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "projector_type": "mlp_gelu"}}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--shards", type=int, default=1)
    args = ap.parse_args(argv)
    if args.shards < 1:
        print(f"error: --shards={args.shards} must be >= 1", file=sys.stderr)
        return 2
    import torch

    os.makedirs(args.out, exist_ok=True)
    table = shapes(args.size)
    names = sorted(table)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i in range(args.shards):
        part = names[i::args.shards]
        fname = "pytorch_model.bin" if args.shards == 1 else f"pytorch_model-{i + 1:05d}-of-{args.shards:05d}.bin"
        state = {n: (torch.randn(table[n], generator=gen) * 0.02).to(torch.bfloat16) for n in part}
        torch.save(state, os.path.join(args.out, fname))
        del state
        weight_map.update({n: fname for n in part})
    if args.shards > 1:
        with open(os.path.join(args.out, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"weight_map": weight_map}, f)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config_json(args.size), f, indent=1)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import janus_fixture  # the tiny tokenizer with Janus's special tokens (byte-level: covers any vocab size)

    janus_fixture.make_tokenizer(args.out)
    n = sum(int(torch.Size(s).numel()) for s in table.values())
    print(f"wrote {args.out}: {len(table)} tensors, {n:,} parameters (bf16), {args.shards} shard(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
