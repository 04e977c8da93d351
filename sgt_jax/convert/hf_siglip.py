"""Import a local Hugging Face SigLIP vision tower into the `ViT` parameter tree.

Works for `SiglipVisionModel` directories (tensors `embeddings.*`, `encoder.*`, `post_layernorm.*`)
and full `SiglipModel` ones (the same under `vision_model.`). The attention-pooling head is not
used (the UMM reads patch tokens). Blocks past `select_layer` are dropped, as the ViT never builds
them. The conv kernel goes from torch [out, in, kh, kw] to flax [kh, kw, in, out]. `_block` converts
one HF layer; `common.stack_layers` stacks them into the scanned `blocks` tree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import flax.linen as nn
import jax
import numpy as np

from sgt_jax.convert.common import HFCheckpoint, check_tree, place, report_unused, stack_layers
from sgt_jax.models.vit import ViT, ViTConfig


def vit_config_from_hf(hf: dict, *, select_layer: int = -1, post_norm: bool = True, dtype: str = "float32",
                       remat: str | bool = "none") -> ViTConfig:
    """Map a SigLIP config.json (vision part) onto `ViTConfig`."""
    if "vision_config" in hf:  # full SiglipModel config
        hf = hf["vision_config"]
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ValueError(f"hidden_act {act!r} is not supported (the ViT MLP uses tanh-approximate GELU)")
    if hf.get("num_channels", 3) != 3:
        raise ValueError("only 3-channel images are supported")
    return ViTConfig(image_size=hf["image_size"], patch_size=hf["patch_size"], width=hf["hidden_size"],
                     depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                     mlp_dim=hf["intermediate_size"], pos="learned", select_layer=select_layer,
                     post_norm=post_norm, ln_eps=float(hf.get("layer_norm_eps", 1e-6)), dtype=dtype, remat=remat)


def umm_overrides(cfg: ViTConfig) -> dict[str, Any]:
    """The `model.umm.vit.*` field values that reproduce `cfg` in an experiment config."""
    fields = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "pos", "select_layer",
              "post_norm", "ln_eps")
    return {f: getattr(cfg, f) for f in fields}


def _ln(ckpt, name):
    return {"scale": ckpt.get(f"{name}.weight"), "bias": ckpt.get(f"{name}.bias")}


def _dense(ckpt, name):
    return {"kernel": ckpt.get(f"{name}.weight").T, "bias": ckpt.get(f"{name}.bias")}


def _block(ckpt: HFCheckpoint, p: str, cfg: ViTConfig) -> dict:
    d, h = cfg.width, cfg.num_heads
    hd = d // h

    def qkv(name):
        return {"kernel": ckpt.get(f"{p}self_attn.{name}_proj.weight").T.reshape(d, h, hd),
                "bias": ckpt.get(f"{p}self_attn.{name}_proj.bias").reshape(h, hd)}

    return {
        "norm1": _ln(ckpt, f"{p}layer_norm1"), "norm2": _ln(ckpt, f"{p}layer_norm2"),
        "q": qkv("q"), "k": qkv("k"), "v": qkv("v"),
        "o": {"kernel": ckpt.get(f"{p}self_attn.out_proj.weight").T.reshape(h, hd, d),
              "bias": ckpt.get(f"{p}self_attn.out_proj.bias")},
        "fc1": _dense(ckpt, f"{p}mlp.fc1"), "fc2": _dense(ckpt, f"{p}mlp.fc2"),
    }


def vit_params(ckpt, cfg: ViTConfig, prefix: str) -> dict:
    """The `ViT` parameter tree from any tensor source with HF SigLIP names under `prefix`
    (`ckpt.get(name)` -> numpy). The one place that lays out the ViT's parameters; the Janus
    importer reuses it through a renaming view."""
    patch = ckpt.get(f"{prefix}embeddings.patch_embedding.weight")  # [out, in, kh, kw]
    params: dict = {
        "patch_embed": {"kernel": patch.transpose(2, 3, 1, 0),
                        "bias": ckpt.get(f"{prefix}embeddings.patch_embedding.bias")},
        "pos_embed": ckpt.get(f"{prefix}embeddings.position_embedding.weight"),
    }
    if cfg.num_blocks:
        params["blocks"] = stack_layers([_block(ckpt, f"{prefix}encoder.layers.{i}.", cfg)
                                         for i in range(cfg.num_blocks)])
    if cfg.post_norm:
        params["post_norm"] = _ln(ckpt, f"{prefix}post_layernorm")
    return params


def abstract_vit(cfg: ViTConfig):
    """Boxed abstract `ViT` params (shapes and logical names), no compute."""
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), np.float32)
    return jax.eval_shape(lambda x: ViT(cfg).init(jax.random.key(0), x), images)["params"]


def convert_vit(directory: str | Path, *, select_layer: int = -1, post_norm: bool = True, dtype: str = "float32",
                remat: str | bool = "none", mesh: jax.sharding.Mesh | None = None, rules: Iterable | None = None,
                param_dtype=np.float32) -> tuple[dict, ViTConfig]:
    """Read a local SigLIP checkpoint -> (params of `ViT` (the UMM's `vit` subtree), its config)."""
    ckpt = HFCheckpoint(directory)
    cfg = vit_config_from_hf(ckpt.config, select_layer=select_layer, post_norm=post_norm, dtype=dtype, remat=remat)
    pre = ckpt.prefix_of("embeddings.patch_embedding.weight")  # "" or "vision_model."
    params = vit_params(ckpt, cfg, pre)
    boxed = abstract_vit(cfg)
    check_tree(params, nn.meta.unbox(boxed), f"{directory} -> ViT")
    skipped = tuple(f"{pre}encoder.layers.{i}." for i in range(cfg.num_blocks, cfg.depth))

    def relevant(k):  # tensors this import is expected to consume
        if not k.startswith(pre) or k.startswith(f"{pre}head.") or k.startswith(skipped):
            return False
        return post_norm or not k.startswith(f"{pre}post_layernorm")

    report_unused(ckpt, relevant, str(directory))
    return place(params, boxed, mesh, rules, param_dtype), cfg
