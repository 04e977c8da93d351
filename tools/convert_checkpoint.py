"""Import local weights into a UMM checkpoint usable as `init_from`.

Janus / Janus-Pro (the whole UMM: LLM, SigLIP, aligners, LlamaGen VQ-16, generation embedding/head):

    python tools/convert_checkpoint.py --janus=/models/Janus-Pro-1B --out=/ckpt/janus_pro_1b [--dtype=bf16|f32]

reads either transformers' `JanusForConditionalGeneration` directory (safetensors) or the original
DeepSeek release (`pytorch_model.bin` / shards + index; needs the `convert` extra for torch), and
writes <out>/checkpoints/0 (params/umm + params/vq), <out>/tokenizer and <out>/manifest.json. Train with
`configs/umm_1b.py:init=<out>,tokenizer=<out>/tokenizer` (or umm_7b).

A Qwen2 / Llama decoder and optionally a SigLIP tower (the rest of the UMM initialised fresh):

    python tools/convert_checkpoint.py --llm=/models/Qwen2.5-0.5B --vit=/models/siglip-so400m \
        --out=runs/hf_init [--mot] [--select_layer=-1] [--no_post_norm]

Then train with `--config.init_from.path=runs/hf_init` plus the printed `--config.model.umm.*`
overrides (also stored in <out>/checkpoints/0/metadata/metadata). Nothing is downloaded: every
directory must already be on local disk.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--janus", default=None, help="Janus / Janus-Pro checkpoint directory (hf or original layout)")
    ap.add_argument("--layout", default="auto", choices=["auto", "hf", "original"], help="--janus on-disk layout")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"], help="--janus: stored parameter dtype")
    ap.add_argument("--tokenizer", default=None, help="--janus: tokenizer directory (default: the --janus dir)")
    ap.add_argument("--llm", default=None, help="HF Qwen2 / Llama / Qwen3 model directory")
    ap.add_argument("--vit", default=None, help="HF SigLIP (vision or full) model directory")
    ap.add_argument("--out", required=True, help="output directory (becomes init_from.path)")
    ap.add_argument("--mot", action="store_true", help="add MoT generation weights copied from the text weights")
    ap.add_argument("--select_layer", type=int, default=-1, help="ViT hidden state fed to the adapter")
    ap.add_argument("--no_post_norm", action="store_true", help="drop SigLIP's post_layernorm")
    args = ap.parse_args(argv)

    if (args.janus is None) == (args.llm is None):
        ap.error("give exactly one of --janus=DIR or --llm=DIR")
    for flag in ("janus", "llm", "vit", "tokenizer"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):
            print(f"error: --{flag}={path!r} is not a directory", file=sys.stderr)
            return 2
    if args.janus is not None:
        from sgt_jax.convert import janus  # after parsing so --help stays fast

        try:
            manifest = janus.convert(args.janus, args.out, dtype=args.dtype, layout=args.layout,
                                     tokenizer_dir=args.tokenizer)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}/checkpoints/0 ({manifest['layout']} layout, {manifest['dtype']}, "
              f"{manifest['num_params']:,} parameters, {len(manifest['skipped'])} tensors skipped), "
              f"{args.out}/tokenizer and {args.out}/manifest.json; special ids {manifest['special_ids']}")
        return 0

    from sgt_jax.convert.to_umm import convert_to_umm

    meta = convert_to_umm(args.llm, args.out, args.vit, mot=args.mot, select_layer=args.select_layer,
                          post_norm=not args.no_post_norm)
    print(f"wrote {args.out}/checkpoints/0 ; train with --config.init_from.path={args.out} and:")
    for key, value in meta["overrides"].items():
        print(f"  --config.{key}={json.dumps(value) if isinstance(value, str) else value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
