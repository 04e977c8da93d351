"""Turn local HF checkpoints (a Qwen2/Llama decoder and optionally a SigLIP vision tower) into a
UMM checkpoint that `init_from` loads, plus the config overrides that give the matching shape.

The checkpoint holds `{"params": {"umm": {"llm": ..., "vit": ...}}}`, i.e. the UMM stage's own
parameter paths, so `init_from.path=<out>` with the default (identity) mapping fills the decoder
and ViT and leaves everything else (adapters, generation head, code embedding, VQ) as initialised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sgt_jax.convert import hf_qwen2, hf_siglip
from sgt_jax.convert.common import save_for_init_from


def convert_to_umm(llm_dir: str | Path, out_dir: str | Path, vit_dir: str | Path | None = None, *,
                   mot: bool = False, select_layer: int = -1, post_norm: bool = True) -> dict[str, Any]:
    """Convert and write; returns the metadata (sources and `overrides`: dotted config field -> value)."""
    llm_params, llm_cfg = hf_qwen2.convert_llm(llm_dir, mot=mot)
    umm = {"llm": llm_params}
    overrides: dict[str, Any] = {f"model.umm.llm.{k}": v for k, v in hf_qwen2.umm_overrides(llm_cfg).items()}
    overrides["model.umm.mot"] = mot
    if vit_dir is not None:
        vit_params, vit_cfg = hf_siglip.convert_vit(vit_dir, select_layer=select_layer, post_norm=post_norm)
        umm["vit"] = vit_params
        overrides.update({f"model.umm.vit.{k}": v for k, v in hf_siglip.umm_overrides(vit_cfg).items()})
    metadata = {"source": {"llm": str(llm_dir), "vit": str(vit_dir) if vit_dir else ""},
                "overrides": overrides, "step": 0, "kind": "hf_import"}
    save_for_init_from(out_dir, {"umm": umm}, metadata)
    return metadata
