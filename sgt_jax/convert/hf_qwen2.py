"""Import a local Hugging Face Qwen2 / Llama / Qwen3 checkpoint into the `LLM` parameter tree.

The three share one layout (`model.layers.N.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
RMSNorms, `model.embed_tokens`, optional `lm_head`); they differ in flags the config mapping
reads: Qwen2 has q/k/v bias, Llama's `attention_bias` adds q/k/v/o bias, Qwen3 adds per-head
q/k RMSNorm. Torch `Linear` weights are [out, in]; ours are [in, out] with head axes split out.
With `mot=True` the generation weights (`*_gen`) start as copies of the text weights (BAGEL).
`_layer` converts one HF layer; `common.stack_layers` stacks them into the scanned `layers` tree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import flax.linen as nn
import jax
import numpy as np

from sgt_jax.convert.common import HFCheckpoint, check_tree, place, report_unused, stack_layers
from sgt_jax.models.llm import CausalLM, LLMConfig

SUPPORTED = ("qwen2", "llama", "qwen3")


def llm_config_from_hf(hf: dict, *, dtype: str = "float32", remat: str | bool = "none", mot: bool = False) -> LLMConfig:
    """Map a HF config.json dict onto `LLMConfig`; raise on features the decoder does not implement."""
    kind = hf.get("model_type", "")
    if kind not in SUPPORTED:
        raise ValueError(f"model_type {kind!r} is not supported; supported: {SUPPORTED}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    if hf.get("mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"rope_type {rope_type!r} (RoPE scaling) is not supported; only plain RoPE")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported")
    heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    return LLMConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
        rope_theta=float(theta), qk_norm=kind == "qwen3", attn_bias=kind == "qwen2" or attention_bias,
        attn_out_bias=kind in ("llama", "qwen3") and attention_bias,
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)), rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mot=mot, dtype=dtype, remat=remat)


def umm_overrides(cfg: LLMConfig) -> dict[str, Any]:
    """The `model.umm.llm.*` field values that reproduce `cfg` in an experiment config."""
    fields = ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "rope_theta",
              "qk_norm", "attn_bias", "attn_out_bias", "tied_embeddings", "rms_eps")
    return {f: getattr(cfg, f) for f in fields}


def _layer(ckpt: HFCheckpoint, p: str, cfg: LLMConfig) -> dict:
    d, h, kvh, hd = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj(name, heads):
        out = {"kernel": ckpt.get(f"{p}self_attn.{name}_proj.weight").T.reshape(d, heads, hd)}
        if cfg.attn_bias:
            out["bias"] = ckpt.get(f"{p}self_attn.{name}_proj.bias").reshape(heads, hd)
        return out

    attn = {"q": proj("q", h), "k": proj("k", kvh), "v": proj("v", kvh),
            "o": {"kernel": ckpt.get(f"{p}self_attn.o_proj.weight").T.reshape(h, hd, d)}}
    if cfg.attn_out_bias:
        attn["o"]["bias"] = ckpt.get(f"{p}self_attn.o_proj.bias")
    if cfg.qk_norm:
        attn["q_norm"] = {"scale": ckpt.get(f"{p}self_attn.q_norm.weight")}
        attn["k_norm"] = {"scale": ckpt.get(f"{p}self_attn.k_norm.weight")}
    return {
        "attn": attn,
        "attn_norm": {"scale": ckpt.get(f"{p}input_layernorm.weight")},
        "mlp_norm": {"scale": ckpt.get(f"{p}post_attention_layernorm.weight")},
        "mlp": {n: {"kernel": ckpt.get(f"{p}mlp.{n}_proj.weight").T} for n in ("gate", "up", "down")},
    }


def _add_mot_copies(tree: dict) -> dict:
    """Give every routed module a `_gen` twin initialised from the text weights.

    `tree` is an `LLM` parameter tree with the stacked `layers` subtree (or one layer's dict under
    `layers`): the copies keep whatever leading layer axis the text weights have.
    """
    out = dict(tree)
    layer = dict(out["layers"])
    for name in ("attn_norm", "mlp_norm", "mlp"):
        layer[name + "_gen"] = jax.tree_util.tree_map(np.copy, layer[name])
    attn = dict(layer["attn"])
    for name in [n for n in layer["attn"] if n in ("q", "k", "v", "o", "q_norm", "k_norm")]:
        attn[name + "_gen"] = jax.tree_util.tree_map(np.copy, attn[name])
    layer["attn"] = attn
    out["layers"] = layer
    if "final_norm" in tree:
        out["final_norm_gen"] = jax.tree_util.tree_map(np.copy, tree["final_norm"])
    return out


def llm_params(ckpt, cfg: LLMConfig, prefix: str, lm_head_key: str) -> dict:
    """The `LLM` parameter tree from any tensor source with HF Llama/Qwen2 names under `prefix`
    (`ckpt.get(name)` -> numpy). The one place that lays out the decoder's parameters; the Janus
    importer reuses it through a renaming view."""
    params: dict = {"embedder": {"embedding": ckpt.get(f"{prefix}embed_tokens.weight")},
                    "final_norm": {"scale": ckpt.get(f"{prefix}norm.weight")}}
    params["layers"] = stack_layers([_layer(ckpt, f"{prefix}layers.{i}.", cfg) for i in range(cfg.depth)])
    if not cfg.tied_embeddings:
        params["lm_head"] = {"kernel": ckpt.get(lm_head_key).T}
    if cfg.mot:
        params = _add_mot_copies(params)
    return params


def convert_llm(directory: str | Path, *, mot: bool = False, dtype: str = "float32", remat: str | bool = "none",
                mesh: jax.sharding.Mesh | None = None, rules: Iterable | None = None,
                param_dtype=np.float32) -> tuple[dict, LLMConfig]:
    """Read a local HF decoder checkpoint -> (params of `LLM` (the UMM's `llm` subtree), its config).

    With `mesh`, leaves are placed on the NamedShardings their logical names map to under `rules`.
    """
    ckpt = HFCheckpoint(directory)
    cfg = llm_config_from_hf(ckpt.config, dtype=dtype, remat=remat, mot=mot)
    pre = ckpt.prefix_of("embed_tokens.weight")  # "model." (or e.g. "language_model.model.")
    head = pre[: -len("model.")] if pre.endswith("model.") else pre
    params = llm_params(ckpt, cfg, pre, f"{head}lm_head.weight")
    boxed = abstract_llm(cfg)
    check_tree(params, nn.meta.unbox(boxed), f"{directory} -> LLM")
    scope = pre[: -len("model.")] if pre.endswith("model.") else pre
    report_unused(ckpt, lambda k: k.startswith(scope) and "rotary_emb" not in k
                  and not (cfg.tied_embeddings and k.endswith("lm_head.weight")), str(directory))
    return place(params, boxed, mesh, rules, param_dtype), cfg


def abstract_llm(cfg: LLMConfig):
    tokens = jax.ShapeDtypeStruct((1, 4), np.int32)
    return jax.eval_shape(lambda t: CausalLM(cfg).init(jax.random.key(0), t), tokens)["params"]["llm"]
