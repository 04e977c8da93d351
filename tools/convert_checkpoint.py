"""Import local Hugging Face weights into a UMM checkpoint usable as `init_from`.

    python tools/convert_checkpoint.py --llm=/models/Qwen2.5-0.5B --vit=/models/siglip-so400m \
        --out=runs/hf_init [--mot] [--select_layer=-1] [--no_post_norm]

Then train with `--config.init_from.path=runs/hf_init` plus the printed `--config.model.umm.*`
overrides (also stored in <out>/checkpoints/0/metadata/metadata). Nothing is downloaded: the
directories must hold config.json and *.safetensors (as written by `save_pretrained`).
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", required=True, help="HF Qwen2 / Llama / Qwen3 model directory")
    ap.add_argument("--vit", default=None, help="HF SigLIP (vision or full) model directory")
    ap.add_argument("--out", required=True, help="output directory (becomes init_from.path)")
    ap.add_argument("--mot", action="store_true", help="add MoT generation weights copied from the text weights")
    ap.add_argument("--select_layer", type=int, default=-1, help="ViT hidden state fed to the adapter")
    ap.add_argument("--no_post_norm", action="store_true", help="drop SigLIP's post_layernorm")
    args = ap.parse_args(argv)

    from sgt_jax.convert.to_umm import convert_to_umm  # after parsing so --help stays fast

    meta = convert_to_umm(args.llm, args.out, args.vit, mot=args.mot, select_layer=args.select_layer,
                          post_norm=not args.no_post_norm)
    print(f"wrote {args.out}/checkpoints/0 ; train with --config.init_from.path={args.out} and:")
    for key, value in meta["overrides"].items():
        print(f"  --config.{key}={json.dumps(value) if isinstance(value, str) else value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
