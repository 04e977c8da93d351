"""Import a local Janus / Janus-Pro checkpoint (deepseek-ai) into one UMM checkpoint for `init_from`.

Two on-disk layouts are read:
- `hf`: transformers' `JanusForConditionalGeneration.save_pretrained` (safetensors, `model.*` names);
- `original`: the DeepSeek release (`pytorch_model.bin`, or shards + `pytorch_model.bin.index.json`;
  `language_model.*`, `vision_model.vision_tower.*` (timm, fused qkv), `aligner.layers.{0,2}`,
  `gen_vision_model.*` (LlamaGen), `gen_aligner.*`, `gen_head.*`, `gen_embed.weight`), read tensor by
  tensor with `torch.load(weights_only=True, mmap=True)`.
Both are first seen through the `hf` names (`original_key` maps an hf name to its original tensor),
then laid out by the decoder's and the ViT's own mappings (`hf_qwen2.llm_params`,
`hf_siglip.vit_params`) and the small Janus-only ones here, so a change of parameter layout (e.g.
stacked layers) is made in one place per component.

Output (`convert`): `<out>/checkpoints/0/state` = {"params": {"umm": ..., "vq": ...}}, the tokenizer
copied to `<out>/tokenizer`, and `<out>/manifest.json` (layout, dtype, every source tensor -> target
path(s), skipped tensors, special token ids, and the config overrides that give the same shapes).
Tensors are converted one at a time from a memory-mapped source (`LazyTensor`) and written with a
bounded host-transfer budget, so the converted tree is the only full copy held in memory.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sgt_jax.convert import hf_qwen2, hf_siglip
from sgt_jax.convert.common import HFCheckpoint, check_tree, save_for_init_from
from sgt_jax.models import umm as umm_lib
from sgt_jax.models import vq as vq_lib
from sgt_jax.models.vit import ViTConfig

log = logging.getLogger(__name__)

LAYOUTS = ("hf", "original")
DTYPES = {"bf16": ml_dtypes.bfloat16, "f32": np.float32}
# Tensors the UMM does not use: SigLIP's attention-pooling head, LlamaGen's usage counter, rotary caches.
SKIP = re.compile(r"(attn_pool\.|codebook_used|rotary_emb\.inv_freq|position_ids$)")
# Janus's special tokens (looked up in the tokenizer, never hard-coded ids).
BOI, EOI, PLACEHOLDER, PAD = "<begin_of_image>", "<end_of_image>", "<image_placeholder>", "<｜▁pad▁｜>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "processor_config.json",
                   "preprocessor_config.json")
# timm SigLIP shapes by `vision_config.params.model_name` (the original config names the model only).
SIGLIP_SHAPES = {"siglip_large_patch16_384": dict(width=1024, layers=24, heads=16, patch_size=16, mlp_ratio=4.0,
                                                  image_size=384)}


# ---------------------------------------------------------------------------------------------
# tensor sources: name -> numpy array, each array tagged with the source key it came from
# ---------------------------------------------------------------------------------------------
class LazyTensor:
    """A source tensor not read yet, plus the view ops (.T, reshape, transpose, slicing) the layout
    functions apply to it. The tree of these is checked and mapped first; `materialize` then reads
    one tensor at a time, so the converted copy is the only full copy ever held."""

    def __init__(self, source: str, shape: tuple[int, ...], load: Callable[[], np.ndarray],
                 release: Callable[[], None] | None = None, ops: tuple = ()):
        self.source, self.shape, self._load, self._release, self._ops = source, tuple(shape), load, release, ops

    def _with(self, op, shape) -> "LazyTensor":
        return LazyTensor(self.source, shape, self._load, self._release, self._ops + (op,))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> "LazyTensor":  # noqa: N802 (numpy's name)
        return self._with(("T",), self.shape[::-1])

    def transpose(self, *axes) -> "LazyTensor":
        return self._with(("transpose", axes), tuple(self.shape[a] for a in axes))

    def reshape(self, *shape) -> "LazyTensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        return self._with(("reshape", shape), np.empty(self.shape, np.bool_).reshape(shape).shape)

    def __getitem__(self, index) -> "LazyTensor":
        return self._with(("index", index), np.empty(self.shape, np.bool_)[index].shape)

    def materialize(self, dtype=None) -> np.ndarray:
        """Read the tensor, apply the ops, return a contiguous copy (in `dtype`); release the source pages."""
        x = self._load()
        for op in self._ops:
            if op[0] == "T":
                x = x.T
            elif op[0] == "transpose":
                x = x.transpose(*op[1])
            elif op[0] == "reshape":
                x = x.reshape(op[1])
            else:
                x = x[op[1]]
        out = np.array(x, dtype=dtype or x.dtype, order="C", copy=True)
        del x
        if self._release is not None:
            self._release()
        return out

    def __array__(self, dtype=None, copy=None):
        return self.materialize(dtype)


def _drop_pages(address: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) over a read-only file mapping: the pages leave this process's resident
    set (they are re-read from the file if touched again), so a memory-mapped source tensor stops
    counting once it has been converted."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = (address + page - 1) // page * page  # only whole pages inside the tensor
    end = (address + nbytes) // page * page
    if end > start and hasattr(mmap, "MADV_DONTNEED"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


class SafetensorsSource:
    """The `hf` layout: every *.safetensors file of a directory (lazy, memory-mapped by safetensors)."""

    def __init__(self, directory: Path):
        self.ckpt = HFCheckpoint(directory)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in sorted(Path(directory).glob("*.safetensors")):
            with open(f, "rb") as h:
                (n,) = struct.unpack("<Q", h.read(8))
                header = json.loads(h.read(n))
            self._shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})

    def keys(self) -> list[str]:
        return self.ckpt.keys()

    def get(self, name: str) -> LazyTensor:
        info = self._shapes.get(name)
        if info is None:
            raise KeyError(f"{self.ckpt.dir}: tensor {name!r} not found; e.g. {self.keys()[:8]}")
        return LazyTensor(name, info, lambda: self.ckpt.get(name))


class TorchBinSource:
    """The `original` layout: `pytorch_model.bin` or its shards, each opened with mmap on first use."""

    def __init__(self, directory: Path):
        index, single = directory / "pytorch_model.bin.index.json", directory / "pytorch_model.bin"
        self._open: dict[Path, dict] = {}
        if index.exists():
            self._where = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif single.exists():
            self._open[single] = self._load(single)
            self._where = {k: single for k in self._open[single]}
        else:
            raise FileNotFoundError(f"{directory}: no pytorch_model.bin or pytorch_model.bin.index.json")

    @staticmethod
    def _load(path: Path) -> dict:
        import torch  # the `convert` extra; only the original layout needs it

        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def _tensor(self, name: str):
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not in the checkpoint; e.g. {self.keys()[:8]}")
        path = self._where[name]
        if path not in self._open:
            self._open[path] = self._load(path)
        return self._open[path][name]

    def _numpy(self, name: str) -> np.ndarray:
        import torch

        t = self._tensor(name)
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bytes (no copy)
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def _release(self, name: str) -> None:
        # torch maps the file privately and read-only here, so dropped pages re-read from disk if a
        # tensor sharing them (e.g. the fused qkv read three times) is touched again.
        storage = self._tensor(name).untyped_storage()
        _drop_pages(storage.data_ptr(), storage.nbytes())

    def get(self, name: str) -> LazyTensor:
        return LazyTensor(name, tuple(self._tensor(name).shape), lambda: self._numpy(name),
                          lambda: self._release(name))


def detect_layout(directory: Path) -> str:
    if any(directory.glob("*.safetensors")):
        return "hf"
    if (directory / "pytorch_model.bin").exists() or (directory / "pytorch_model.bin.index.json").exists():
        return "original"
    raise FileNotFoundError(f"--janus={directory}: neither *.safetensors (transformers layout) nor "
                            "pytorch_model.bin[.index.json] (original DeepSeek layout) found")


# ---------------------------------------------------------------------------------------------
# hf name -> original name (one table; the test and the synthetic writer invert it)
# ---------------------------------------------------------------------------------------------
_VQ_RENAMES = [(r"\.down\.(\d+)\.block\.", r".conv_blocks.\1.res."), (r"\.down\.(\d+)\.attn\.", r".conv_blocks.\1.attn."),
               (r"\.down\.(\d+)\.downsample\.", r".conv_blocks.\1.downsample."),
               (r"\.up\.(\d+)\.block\.", r".conv_blocks.\1.res."), (r"\.up\.(\d+)\.attn\.", r".conv_blocks.\1.attn."),
               (r"\.up\.(\d+)\.upsample\.", r".conv_blocks.\1.upsample."),
               (r"\.mid\.block_1\.", ".mid.0."), (r"\.mid\.attn_1\.", ".mid.1."), (r"\.mid\.block_2\.", ".mid.2.")]
_VIT_BLOCK = re.compile(r"^model\.vision_model\.encoder\.layers\.(\d+)\.(.*)$")
_FIXED = {
    "lm_head.weight": "language_model.lm_head.weight",
    "model.vision_model.embeddings.patch_embedding.weight": "vision_model.vision_tower.patch_embed.proj.weight",
    "model.vision_model.embeddings.patch_embedding.bias": "vision_model.vision_tower.patch_embed.proj.bias",
    "model.vision_model.post_layernorm.weight": "vision_model.vision_tower.norm.weight",
    "model.vision_model.post_layernorm.bias": "vision_model.vision_tower.norm.bias",
    "model.generation_embeddings.weight": "gen_embed.weight",
}
_PREFIXES = [("model.language_model.", "language_model.model."), ("model.aligner.fc1.", "aligner.layers.0."),
             ("model.aligner.hidden_layers.0.", "aligner.layers.2."), ("model.generation_aligner.fc1.", "gen_aligner.layers.0."),
             ("model.generation_aligner.hidden_layers.0.", "gen_aligner.layers.2."),
             ("model.generation_head.proj_out.", "gen_head.output_mlp_projector."),
             ("model.generation_head.vision_head.", "gen_head.vision_head.")]
_VIT_PARTS = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.projection_layer.": "attn.proj.",
              "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
Part = Any  # None | ("qkv", index) | "pos"


def original_key(name: str) -> tuple[str, Part]:
    """An `hf`-layout tensor name -> (original-layout name, part): part ("qkv", i) is the i-th third
    (q, k, v) along axis 0 of the fused timm qkv tensor; "pos" drops timm's leading axis of pos_embed."""
    if name in _FIXED:
        return _FIXED[name], None
    if name == "model.vision_model.embeddings.position_embedding.weight":
        return "vision_model.vision_tower.pos_embed", "pos"
    m = _VIT_BLOCK.match(name)
    if m:
        i, rest = m.groups()
        base = f"vision_model.vision_tower.blocks.{i}."
        for j, qkv in enumerate(("q", "k", "v")):
            if rest.startswith(f"self_attn.{qkv}_proj."):
                return base + "attn.qkv." + rest.rsplit(".", 1)[1], ("qkv", j)
        for src, dst in _VIT_PARTS.items():
            if rest.startswith(src):
                return base + dst + rest[len(src):], None
    for src, dst in _PREFIXES:
        if name.startswith(src):
            return dst + name[len(src):], None
    if name.startswith("model.vqmodel."):
        out = "gen_vision_model." + name[len("model.vqmodel."):]
        for pat, rep in _VQ_RENAMES:
            out = re.sub(pat, rep, out)
        return out, None
    raise KeyError(f"no original-layout name for {name!r}")


def _take_part(x: np.ndarray, part: Part) -> np.ndarray:
    if part is None:
        return x
    if part == "pos":
        return x.reshape(x.shape[-2], x.shape[-1])
    third = x.shape[0] // 3
    return x[part[1] * third:(part[1] + 1) * third]


def to_original_state(hf_state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `original_key` over a whole `hf` state dict (numpy or torch values): q/k/v fused
    back into timm's qkv, pos_embed given its leading axis. Used to write original-layout fixtures."""
    out: dict[str, Any] = {}
    fused: dict[str, list] = {}
    for name, value in hf_state.items():
        if SKIP.search(name):
            continue
        key, part = original_key(name)
        if part is None:
            out[key] = value
        elif part == "pos":
            out[key] = value[None]
        else:
            fused.setdefault(key, [None] * 3)[part[1]] = value
    for key, parts in fused.items():
        out[key] = _concat(parts)
    return out


def _concat(parts):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0)
    import torch

    return torch.cat(parts, dim=0)


class HFNames:
    """Serves `hf`-layout names from either layout's source (`original_key` for the original one)."""

    def __init__(self, source, layout: str):
        self.source, self.layout = source, layout

    def get(self, name: str) -> np.ndarray:
        if self.layout == "hf":
            return self.source.get(name)
        key, part = original_key(name)
        return _take_part(self.source.get(key), part)

    def __contains__(self, name: str) -> bool:
        if not hasattr(self, "_keys"):
            self._keys = set(self.source.keys())
        return (name if self.layout == "hf" else original_key(name)[0]) in self._keys


class _Renamed:
    """A view that rewrites requested names (e.g. SigLIP's `out_proj` -> Janus's `projection_layer`)."""

    def __init__(self, base, rewrite: Callable[[str], str]):
        self.base, self.rewrite = base, rewrite

    def get(self, name: str) -> np.ndarray:
        return self.base.get(self.rewrite(name))


# ---------------------------------------------------------------------------------------------
# configs from the checkpoint
# ---------------------------------------------------------------------------------------------
def _read_config(directory: Path) -> dict:
    f = directory / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"--janus={directory}: no config.json")
    return json.loads(f.read_text())


def llm_config(raw: dict, layout: str, tied: bool) -> Any:
    text = dict(raw["text_config"] if layout == "hf" else raw["language_config"])
    text.setdefault("model_type", "llama")
    text["tie_word_embeddings"] = tied  # decided by the tensors present, not by a flag's default
    return hf_qwen2.llm_config_from_hf(text)


def vit_config(raw: dict, layout: str) -> ViTConfig:
    """SigLIP-L as Janus builds it: learned positions, exact GELU, final LayerNorm, select_layer."""
    if layout == "hf":
        v = raw.get("vision_config", {})
        if v.get("use_qk_norm", False):
            raise ValueError("vision_config.use_qk_norm=True is not supported")
        width, layers, heads = v.get("hidden_size", 1024), v.get("num_hidden_layers", 24), v.get("num_attention_heads", 16)
        patch, size, ratio = v.get("patch_size", 16), v.get("image_size", 384), v.get("mlp_ratio", 4.0)
        eps, act, select = float(v.get("layer_norm_eps", 1e-6)), v.get("hidden_act", "gelu"), -1
        depth = raw.get("vision_config", {}).get("depth", 2)
        q = raw.get("vq_config", {})
        if q.get("num_hidden_layers", 2) != 2 or q.get("hidden_act", "gelu") != "gelu" or q.get("double_latent"):
            raise ValueError(f"vq_config (generation aligner depth {q.get('num_hidden_layers')}, act "
                             f"{q.get('hidden_act')!r}, double_latent {q.get('double_latent')}) is not supported; "
                             "Janus: depth 2, 'gelu', single latent")
    else:
        p = dict(raw.get("vision_config", {}).get("params", {}))
        shape = dict(SIGLIP_SHAPES.get(p.get("model_name", ""), {}))
        shape.update({k: p[k] for k in ("width", "layers", "heads", "patch_size", "mlp_ratio", "image_size") if k in p})
        missing = [k for k in ("width", "layers", "heads", "patch_size", "mlp_ratio") if k not in shape]
        if missing:
            raise ValueError(f"vision_config.params.model_name={p.get('model_name')!r} is not a known SigLIP "
                             f"({sorted(SIGLIP_SHAPES)}) and the params do not give {missing}")
        width, layers, heads, patch = shape["width"], shape["layers"], shape["heads"], shape["patch_size"]
        size, ratio = p.get("image_size", shape.get("image_size", 384)), shape["mlp_ratio"]
        eps, act, select = 1e-6, "gelu", int(p.get("select_layer", -1))
        if p.get("select_feature", "same") != "same":
            raise ValueError(f"vision_config.params.select_feature={p['select_feature']!r}; supported: 'same'")
        depth = raw.get("aligner_config", {}).get("params", {}).get("depth", 2)
    if act != "gelu":
        raise ValueError(f"vision hidden_act {act!r} is not supported (Janus uses exact 'gelu')")
    if depth != 2:
        raise ValueError(f"aligner depth {depth} is not supported (Janus: Linear, GELU, Linear)")
    # timm keeps depth + select + 1 blocks (select <= 0) or `select` blocks, then its final norm: the
    # same count our ViT builds for that select_layer, with post_norm on the selected state.
    return ViTConfig(image_size=int(size), patch_size=int(patch), width=int(width), depth=int(layers),
                     num_heads=int(heads), mlp_dim=int(width * ratio), pos="learned", select_layer=select,
                     post_norm=True, ln_eps=eps, gelu_approximate=False)


def vq_spec(src: HFNames, image_size: int) -> vq_lib.VQSpec:
    """LlamaGen VQ shape read from the tensors themselves (both layouts, any size)."""
    p = "model.vqmodel."
    width = src.get(f"{p}encoder.conv_in.weight").shape[0]
    z = src.get(f"{p}encoder.conv_out.weight").shape[0]
    codebook = src.get(f"{p}quantize.embedding.weight")
    levels, res = 0, 0
    while f"{p}encoder.down.{levels}.block.0.conv1.weight" in src:
        levels += 1
    while f"{p}encoder.down.0.block.{res}.conv1.weight" in src:
        res += 1
    mult = tuple(int(src.get(f"{p}encoder.down.{i}.block.0.conv1.weight").shape[0] // width) for i in range(levels))
    return vq_lib.VQSpec(family="llamagen", image_size=image_size, codebook_size=int(codebook.shape[0]),
                         code_dim=int(codebook.shape[1]), downsample=2 ** (levels - 1), width=int(width),
                         channel_mult=mult, num_res_blocks=res, z_channels=int(z))


# ---------------------------------------------------------------------------------------------
# parameter layout of the Janus-only pieces
# ---------------------------------------------------------------------------------------------
def _dense(src, name: str) -> dict:
    return {"kernel": src.get(f"{name}.weight").T, "bias": src.get(f"{name}.bias")}


def _mlp(src, first: str, second: str) -> dict:
    return {"fc1": _dense(src, first), "fc2": _dense(src, second)}


def _conv(src, name: str) -> dict:
    return {"kernel": src.get(f"{name}.weight").transpose(2, 3, 1, 0), "bias": src.get(f"{name}.bias")}


def _gn(src, name: str) -> dict:
    return {"scale": src.get(f"{name}.weight"), "bias": src.get(f"{name}.bias")}


def _res(src, p: str) -> dict:
    out = {"norm1": _gn(src, f"{p}norm1"), "conv1": _conv(src, f"{p}conv1"), "norm2": _gn(src, f"{p}norm2"),
           "conv2": _conv(src, f"{p}conv2")}
    if f"{p}nin_shortcut.weight" in src:
        out["nin_shortcut"] = _conv(src, f"{p}nin_shortcut")
    return out


def _attn(src, p: str) -> dict:
    return {"norm": _gn(src, f"{p}norm"), **{n: _conv(src, f"{p}{n}") for n in ("q", "k", "v", "proj_out")}}


def _mid(src, p: str) -> dict:
    return {"block_1": _res(src, f"{p}block_1."), "attn_1": _attn(src, f"{p}attn_1."), "block_2": _res(src, f"{p}block_2.")}


def vq_params(src, spec: vq_lib.VQSpec, prefix: str = "model.vqmodel.") -> dict:
    """`VQModel` (llamagen family) params from `hf` names: encoder (+quant_conv), decoder (+post_quant_conv), codebook."""
    e, d, levels = f"{prefix}encoder.", f"{prefix}decoder.", len(spec.channel_mult)
    enc: dict = {"conv_in": _conv(src, f"{e}conv_in"), "mid": _mid(src, f"{e}mid."), "norm_out": _gn(src, f"{e}norm_out"),
                 "conv_out": _conv(src, f"{e}conv_out"), "quant_conv": _conv(src, f"{prefix}quant_conv")}
    dec: dict = {"post_quant_conv": _conv(src, f"{prefix}post_quant_conv"), "conv_in": _conv(src, f"{d}conv_in"),
                 "mid": _mid(src, f"{d}mid."), "norm_out": _gn(src, f"{d}norm_out"), "conv_out": _conv(src, f"{d}conv_out")}
    for lv in range(levels):
        for i in range(spec.num_res_blocks):
            enc[f"down_{lv}_block_{i}"] = _res(src, f"{e}down.{lv}.block.{i}.")
            if lv == levels - 1:
                enc[f"down_{lv}_attn_{i}"] = _attn(src, f"{e}down.{lv}.attn.{i}.")
        if lv != levels - 1:
            enc[f"down_{lv}_downsample"] = _conv(src, f"{e}down.{lv}.downsample.conv")
        for i in range(spec.num_res_blocks + 1):
            dec[f"up_{lv}_block_{i}"] = _res(src, f"{d}up.{lv}.block.{i}.")
            if lv == 0:
                dec[f"up_{lv}_attn_{i}"] = _attn(src, f"{d}up.{lv}.attn.{i}.")
        if lv != levels - 1:
            dec[f"up_{lv}_upsample"] = _conv(src, f"{d}up.{lv}.upsample.conv")
    return {"encoder": enc, "decoder": dec, "quantizer": {"codebook": src.get(f"{prefix}quantize.embedding.weight")}}


def umm_params(src, cfg: umm_lib.UMMConfig) -> dict:
    """The whole `UMM` tree from `hf` names: decoder and ViT by their own mappings, then the aligners,
    the code embedding and the generation head."""
    vit_src = _Renamed(src, lambda n: n.replace("self_attn.out_proj.", "self_attn.projection_layer."))
    return {
        "llm": hf_qwen2.llm_params(src, cfg.llm, "model.language_model.", "lm_head.weight"),
        "vit": hf_siglip.vit_params(vit_src, cfg.vit, "model.vision_model."),
        "und_adapter": _mlp(src, "model.aligner.fc1", "model.aligner.hidden_layers.0"),
        "code_embed": {"embedding": src.get("model.generation_embeddings.weight")},
        "gen_adapter": _mlp(src, "model.generation_aligner.fc1", "model.generation_aligner.hidden_layers.0"),
        "gen_head": _mlp(src, "model.generation_head.proj_out", "model.generation_head.vision_head"),
    }


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def special_ids(tokenizer) -> dict[str, int]:
    """Janus's structural ids from the tokenizer: bos, eos, pad (`<｜▁pad▁｜>` as the reference looks it
    up, else the tokenizer's pad), `<begin_of_image>`, `<end_of_image>`, `<image_placeholder>`."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (BOI, EOI, PLACEHOLDER) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the Janus image tokens {missing}")
    pad = vocab.get(PAD, tokenizer.pad_token_id)
    if pad is None or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer needs bos, eos and pad ({PAD!r} or a pad_token); got bos="
                         f"{tokenizer.bos_token_id}, eos={tokenizer.eos_token_id}, pad={pad}")
    return {"bos": int(tokenizer.bos_token_id), "eos": int(tokenizer.eos_token_id), "pad": int(pad),
            "boi": int(vocab[BOI]), "eoi": int(vocab[EOI]), "image": int(vocab[PLACEHOLDER])}


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (directory / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    files = [f for f in TOKENIZER_FILES if (src / f).exists()]
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise FileNotFoundError(f"{src}: no tokenizer.json / tokenizer.model to copy (pass --tokenizer=DIR)")
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(src / f, dst / f)
    return files


# ---------------------------------------------------------------------------------------------
# the conversion
# ---------------------------------------------------------------------------------------------
def config_overrides(cfg: umm_lib.UMMConfig, spec: vq_lib.VQSpec) -> dict[str, Any]:
    """Dotted config fields that give an experiment config this checkpoint's shapes."""
    out = {f"model.umm.llm.{k}": v for k, v in hf_qwen2.umm_overrides(cfg.llm).items()}
    out.update({f"model.umm.vit.{k}": v for k, v in hf_siglip.umm_overrides(cfg.vit).items()})
    out["model.umm.vit.gelu_approximate"] = cfg.vit.gelu_approximate
    # model.umm.codebook_size / num_codes are derived from the VQ and image size by config.finalize.
    out.update({"model.umm.gen_embed_dim": cfg.gen_embed_dim, "model.umm.gen_adapter_dim": cfg.gen_adapter_dim,
                "model.umm.gen_head_dim": cfg.gen_head_dim, "model.umm.und_adapter_dim": cfg.und_adapter_dim,
                "model.umm.mot": False, "data.image_size": spec.image_size})
    out.update({f"model.vq.{k}": getattr(spec, k) for k in ("family", "codebook_size", "code_dim", "downsample",
                                                              "width", "num_res_blocks", "z_channels")})
    out["model.vq.channel_mult"] = tuple(spec.channel_mult)
    return out


def read(directory: str | Path, layout: str = "auto") -> tuple[dict, umm_lib.UMMConfig, vq_lib.VQSpec, HFNames]:
    """Read a Janus checkpoint -> ({"umm", "vq"} tree of tagged numpy views, UMM config, VQ spec, source)."""
    directory = Path(directory)
    layout = detect_layout(directory) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not allowed; allowed: {['auto', *LAYOUTS]}")
    raw = _read_config(directory)
    source = SafetensorsSource(directory) if layout == "hf" else TorchBinSource(directory)
    src = HFNames(source, layout)
    tied = "lm_head.weight" not in src
    llm = llm_config(raw, layout, tied)
    vit = vit_config(raw, layout)
    spec = vq_spec(src, vit.image_size)
    aligner_hidden = src.get("model.aligner.fc1.weight").shape[0]
    gen_adapter_hidden = src.get("model.generation_aligner.fc1.weight").shape[0]
    gen_head_hidden = src.get("model.generation_head.proj_out.weight").shape[0]
    cfg = umm_lib.UMMConfig(llm=llm, vit=vit, codebook_size=spec.codebook_size, num_codes=spec.num_codes,
                            gen_embed_dim=spec.code_dim, gen_adapter_dim=int(gen_adapter_hidden),
                            gen_head_dim=int(gen_head_hidden), und_adapter_dim=int(aligner_hidden))
    tree = {"umm": umm_params(src, cfg), "vq": vq_params(src, spec)}
    return tree, cfg, spec, src


def abstract_params(cfg: umm_lib.UMMConfig, spec: vq_lib.VQSpec) -> dict:
    """Shapes of the {"umm", "vq"} trees the converted checkpoint must match (no compute)."""
    inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          umm_lib.dummy_inputs(cfg, 1, 2 + cfg.num_vit_tokens + cfg.num_codes))
    umm = jax.eval_shape(lambda i: umm_lib.UMM(cfg).init(jax.random.key(0), i), inputs)["params"]
    images = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), jnp.float32)
    vq = jax.eval_shape(lambda x: vq_lib.VQModel(spec).init(jax.random.key(0), x), images)["params"]
    return {"umm": nn.meta.unbox(umm), "vq": nn.meta.unbox(vq)}


def _path(p) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in p)


def convert(directory: str | Path, out_dir: str | Path, *, dtype: str = "bf16", layout: str = "auto",
            tokenizer_dir: str | Path | None = None) -> dict:
    """Convert and write the checkpoint, tokenizer and manifest; returns the manifest."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not allowed; allowed: {sorted(DTYPES)}")
    directory, out_dir = Path(directory), Path(out_dir)
    tok_src = Path(tokenizer_dir) if tokenizer_dir else directory
    tokenizer = load_tokenizer(tok_src)  # fail on a bad tokenizer before any tensor is read
    ids = special_ids(tokenizer)
    tree, cfg, spec, src = read(directory, layout)
    check_tree(tree, abstract_params(cfg, spec), f"{directory} -> UMM + VQ")
    if len(tokenizer) > cfg.llm.vocab_size:
        raise ValueError(f"tokenizer in {tok_src} has {len(tokenizer)} ids > the checkpoint's vocab "
                         f"{cfg.llm.vocab_size}")

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    mapping: dict[str, list[str]] = {}
    for path, leaf in leaves:
        if hasattr(leaf, "sources"):  # a stacked (scanned) layer leaf: source i -> path[i]
            for i, source in enumerate(leaf.sources):
                mapping.setdefault(source, []).append(f"{_path(path)}[{i}]")
        else:
            mapping.setdefault(leaf.source, []).append(_path(path))
    all_keys = src.source.keys()
    skipped = sorted(k for k in all_keys if k not in mapping)
    unused_blocks = re.compile(r"(encoder\.layers|vision_tower\.blocks)\.(\d+)\.")
    unexpected = [k for k in skipped if not SKIP.search(k) and not (
        unused_blocks.search(k) and int(unused_blocks.search(k).group(2)) >= cfg.vit.num_blocks)]
    if unexpected:  # before anything is read or written
        raise ValueError(f"{directory}: {len(unexpected)} tensors have no place in the UMM: {unexpected[:10]}")
    # One tensor at a time: read, lay out, cast; the memory-mapped source pages are dropped after each.
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(leaf.materialize(DTYPES[dtype])) for _, leaf in leaves])
    del leaves, tree
    num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    overrides = config_overrides(cfg, spec)
    manifest = {"source": str(directory), "layout": src.layout, "dtype": dtype, "special_ids": ids,
                "overrides": overrides, "mapping": mapping, "skipped": skipped,
                "num_tensors": len(all_keys), "num_params": num_params}
    meta = {"kind": "janus_import", "step": 0, "source": str(directory), "overrides": overrides}
    save_for_init_from(out_dir, params, meta, max_host_transfer_gb=1)
    files = _copy_tokenizer(tok_src, out_dir / "tokenizer")
    manifest["tokenizer_files"] = files
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=list))
    log.info("converted %s (%s, %d tensors, %d skipped) -> %s", directory, src.layout, len(all_keys), len(skipped),
             out_dir)
    return manifest
