"""The config schema: every field an experiment may set, its field rules, and the derived fields.

A leaf module (it imports nothing else of sgt_jax), so any layer may read it. The flow of every
entry point is

    cfg = get_config(arg)            # configs/*.py: default_config() + the experiment's fields
    ... command-line overrides ...   # --config.optim.lr=3e-4 (ml_collections config_flags)
    finalize(cfg)                    # derives DERIVED_FIELDS once, from the fields they depend on
    sgt_jax.checks.validate(cfg)     # schema, field rules, every section's cross-field checks

`finalize` derives the row length, the UMM's code count and codebook size, and (when a config
budgets in examples) the step count, so an override of a field they depend on is never stale. A
derived field cannot be set by hand: a value other than its derivation is a ConfigError naming it.
The defaults define the full schema, so unknown fields, wrong types and non-finite numbers are
rejected by name (as MaxText does with base.yml). Rules that need other sections' code live next
to that code and are listed, explicitly, in `sgt_jax/checks.py`.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
import re
from types import ModuleType
from typing import Any, Mapping, Sequence

import ml_collections

STAGES = ("vq", "umm")
PROXIES = ("segmentation", "semantic", "depth", "edge", "reconstruction", "mae")
TASKS = ("understanding", "t2i") + tuple(f"proxy_{p}" for p in PROXIES)
MESH_AXES = ("data", "fsdp", "tensor")
WORLDS = ("full", "simple")  # Shapes World contents by name (sgt_jax/data/shapes_world.WORLD_PRESETS)
SPLITS = ("train", "validation", "test", "heldout")  # Shapes World splits (sgt_jax/data/shapes_world.py)
EVAL_PARTS = ("cvbench", "geneval", "segmentation", "probes", "attention")  # eval.umm.parts
# Structural tokens of each task row besides its image spans and text (laid out by
# sgt_jax/data/sequences.py): understanding <bos><img></img>, t2i <bos><boi><eoi>,
# proxy <bos><img></img><boi><eoi>.
ROW_TOKENS = {"understanding": 3, "t2i": 3, "proxy": 5}
SEQ_LEN_MULTIPLE = 16  # data.max_seq_len is rounded up to this


class ConfigError(ValueError):
    """A config field is unknown, mistyped or impossible. The message names field, value and what is allowed."""


def default_config() -> ml_collections.ConfigDict:
    """The full schema with defaults. Sections: data, model, optim, train, mesh, checkpoint, eval."""
    c = ml_collections.ConfigDict()
    c.stage = "vq"  # which stage tools/train.py trains: one of STAGES
    c.seed = 0
    c.init_from = ml_collections.ConfigDict()
    c.init_from.path = ""  # workdir or checkpoint dir of another stage ("" = from scratch)
    c.init_from.mapping = ""  # "src_prefix->dst_prefix,..." parameter-path mapping
    c.init_from.step = -1  # -1 = latest

    # ---- data ----
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "shapes_world"
    c.data.data_dir = ""  # TFDS data_dir; "" = $SGT_DATA_DIR or ./data_cache (built on demand)
    c.data.image_size = 64
    c.data.min_objects = 1
    c.data.max_objects = 4
    c.data.world = "full"  # WORLDS: "simple" = 4 shapes, 4 colours, flat on plain (Shapes World only)
    c.data.train_size = 4096
    c.data.validation_size = 256
    c.data.test_size = 256
    c.data.heldout_size = 256
    # Task mixture weights; names in TASKS. SGT default is 2 proxy : 1 VQA. How the weights apply is
    # `data.mixing` (evidence block, issue 12): "rows" = every batch mixes rows in these proportions
    # (grain `mix` interleaves examples); "batches" = whole single-task batches in a fixed cycle, e.g.
    # 2:1 -> proxy, proxy, VQA, ... (the paper's OmniGen2 code).
    c.data.mixture = ml_collections.ConfigDict({"understanding": 1.0})
    c.data.mixing = "rows"
    # Real datasets (sgt_jax.data.datasets.REAL_DATASETS): task -> dataset that feeds it (tasks not
    # named read data.dataset), and dataset -> local copy of its release (TFDS manual_dir, used to
    # build it on first use). E.g. {"proxy_segmentation": "sam_sgt", "understanding": "llava_onevision"}.
    c.data.sources = ml_collections.ConfigDict({})
    c.data.manual_dirs = ml_collections.ConfigDict({})
    c.data.shuffle_seed = 0
    c.data.num_workers = 0  # grain worker processes (0 = in-process)
    c.data.cond_dropout = 0.1  # drop the text condition of t2i / proxy samples (CFG)
    # Text room per row (tokens after the structural tokens and image spans, see ROW_TOKENS): the row
    # length `data.max_seq_len` is derived from these by `finalize` for the tasks of the mixture.
    c.data.answer_room = 72  # understanding: question + answer tokens
    c.data.prompt_room = 36  # text-to-image: prompt tokens
    c.data.instruction_room = 48  # SGT proxy: instruction tokens
    c.data.max_seq_len = 0  # DERIVED by finalize: round_up(longest mixed task row, 16)
    c.data.tokenizer_dir = ""  # "" = the Shapes World tokenizer built next to the data
    c.data.tokenizer_vocab_size = 512  # Shapes World BPE size (256 bytes + 8 specials + merges); <= llm vocab
    c.data.tokenizer_corpus_scenes = 1000  # train scenes whose texts train the Shapes World BPE
    # UMM task sequences (sgt_jax/data/sequences.py): loss weights written into the loss arrays.
    c.data.text_loss_weight = 1.5  # text CE weight on answer tokens (SGT recipe)
    c.data.gen_loss_weight = 1.0  # code CE weight on generated image codes
    c.data.caption_fraction = 0.25  # share of Shapes World understanding samples that are captions (else MCQ)

    # ---- model ----
    c.model = ml_collections.ConfigDict()
    c.model.vq = ml_collections.ConfigDict()
    c.model.vq.family = "vit"  # "vit" | "conv" | "llamagen" (LlamaGen VQ-16 as published, Janus-Pro)
    c.model.vq.codebook_size = 1024
    c.model.vq.code_dim = 8
    c.model.vq.downsample = 8
    c.model.vq.width = 128
    c.model.vq.depth = 2
    c.model.vq.num_heads = 4
    c.model.vq.mlp_ratio = 4
    c.model.vq.channel_mult = (1, 2, 2)
    c.model.vq.beta = 0.25  # commitment weight
    c.model.vq.recon_loss = "l2"  # "l1" | "l2"
    c.model.vq.gan_weight = 0.0
    c.model.vq.dead_code_reinit_every = 100  # steps; 0 disables
    c.model.vq.dead_code_threshold = 0.1  # dead = EMA usage frequency < threshold / codebook_size
    c.model.vq.usage_decay = 0.99  # EMA decay of per-code usage frequencies
    c.model.vq.decoder_depth = 0  # vit: decoder blocks (0 = depth)
    c.model.vq.num_res_blocks = 1  # conv: resnet blocks per resolution
    c.model.vq.z_channels = 256  # llamagen: latent channels around quant_conv (Janus-Pro import, issue 8)
    c.model.vq.refine_channels = 0  # vit: full-resolution 3x3 conv head channels (0 = linear patch head)
    # Training images: scene photos and proxy renderings, "kind:weight,..." over render.PROXIES minus mae.
    c.model.vq.target_mix = "reconstruction:1,segmentation:1,semantic:1,depth:1,edge:1"
    c.model.vq.mask_loss_weight = 1.0  # recon-loss weight of palette masks (segmentation, semantic)
    # Unified model (sgt_jax/models/umm.py). Compute dtype and remat come from train.compute_dtype
    # and train.remat; its rules are `umm.check_config` (listed in sgt_jax/checks.py).
    c.model.umm = ml_collections.ConfigDict()
    c.model.umm.llm = ml_collections.ConfigDict()
    c.model.umm.llm.vocab_size = 512  # must cover the tokenizer
    c.model.umm.llm.width = 256
    c.model.umm.llm.depth = 4
    c.model.umm.llm.num_heads = 4
    c.model.umm.llm.num_kv_heads = 2  # grouped-query attention; divides num_heads
    c.model.umm.llm.head_dim = 64
    c.model.umm.llm.mlp_dim = 768  # SwiGLU hidden width
    c.model.umm.llm.rope_theta = 10000.0
    c.model.umm.llm.qk_norm = False  # RMSNorm on q and k per head (Qwen3 style)
    c.model.umm.llm.attn_bias = False  # q/k/v bias (Qwen2: True)
    c.model.umm.llm.attn_out_bias = False  # output-projection bias (Llama attention_bias=True)
    c.model.umm.llm.tied_embeddings = True
    c.model.umm.llm.rms_eps = 1e-6
    c.model.umm.vit = ml_collections.ConfigDict()  # understanding encoder (SigLIP layout)
    c.model.umm.vit.image_size = 64
    c.model.umm.vit.patch_size = 8
    c.model.umm.vit.width = 128
    c.model.umm.vit.depth = 2
    c.model.umm.vit.num_heads = 4
    c.model.umm.vit.mlp_dim = 512
    c.model.umm.vit.pos = "learned"  # "learned" | "sincos"
    c.model.umm.vit.select_layer = -1  # hidden state fed to the adapter: 0 = patch embeddings, -1 = last block
    c.model.umm.vit.post_norm = True  # final LayerNorm on the selected state (SigLIP post_layernorm)
    c.model.umm.vit.ln_eps = 1e-6
    # Janus-Pro import (issue 8): SigLIP-L as timm builds it uses exact GELU; HF SigLIP uses tanh.
    c.model.umm.vit.gelu_approximate = True
    c.model.umm.mot = False  # BAGEL-style Mixture-of-Transformers weights for generation tokens
    c.model.umm.codebook_size = 0  # DERIVED by finalize: model.vq.codebook_size
    c.model.umm.num_codes = 0  # DERIVED by finalize: code positions per image, (data.image_size / vq.downsample)^2
    c.model.umm.gen_embed_dim = 64  # code-id embedding table width (Janus: 8)
    c.model.umm.gen_adapter_dim = 256  # code embedding -> LLM adapter hidden width
    c.model.umm.gen_head_dim = 256  # generation head hidden width (MLP -> codebook logits)
    c.model.umm.und_adapter_dim = 256  # ViT -> LLM adapter hidden width
    # UMM training stage (sgt_jax/train/stages/umm_stage.py). The frozen VQ lives in params/vq and
    # arrives through init_from (base: the VQ workdir with mapping "->vq"; post: the base run).
    c.model.umm_stage = ml_collections.ConfigDict()
    c.model.umm_stage.freeze_vit = False  # also freeze the understanding ViT (the VQ is always frozen)

    # ---- optimisation ----
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.schedule = "constant"  # "constant" | "cosine"
    c.optim.warmup_steps = 100
    c.optim.end_lr_fraction = 0.0  # cosine floor, as a fraction of lr
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.ema_decay = 0.0  # 0 disables EMA
    c.optim.grad_accum_steps = 1
    c.optim.freeze = ""  # comma-separated regexes of parameter paths to freeze

    # ---- training loop ----
    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # DERIVED by finalize when train.num_examples > 0 (then leave it at -1)
    # Training budget in examples (rows): > 0 derives train.steps = ceil(num_examples / batch_size), so
    # changing the batch size keeps the data budget; 0 = train.steps is set directly.
    c.train.num_examples = 0
    c.train.batch_size = 32  # global
    c.train.compute_dtype = "float32"  # "float32" | "bfloat16"; params stay float32
    c.train.remat = False
    c.train.log_every = 50
    c.train.max_consecutive_skips = 10  # stop after this many non-finite steps in a row
    c.train.profile_start_step = -1  # -1 disables the jax.profiler trace
    c.train.profile_num_steps = 5
    c.train.peak_tflops_per_device = 0.0  # 0 = per-platform default (measured matmul peak on CPU)
    c.train.distributed = False  # call jax.distributed.initialize()
    c.train.coordinator_address = ""
    c.train.num_processes = 1
    c.train.process_id = 0
    c.train.max_wall_minutes = 0.0  # 0 = no limit; otherwise save and stop after this long
    c.train.tensorboard = True  # clu TensorBoard writers (imports TF); False = log lines only

    # ---- mesh and sharding ----
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    # Logical axis name -> mesh axis (or None). Covers parameters and activations; every name a
    # parameter or activation uses needs a rule (tests/test_sharding.py walks every config). Rules
    # are tried in order and a name may repeat as a fallback: a mesh axis already taken by another
    # dim of the same array is skipped (flax's priority rules). A ("vocab", "fsdp") fallback (the
    # generation head's ("mlp", "vocab") kernel -> (tensor, fsdp)) is left out on purpose: with it,
    # XLA:CPU's sharded gen logits differed from the unsharded ones by up to 3.2 in
    # tests/test_model.py::test_sharded_apply_matches_unsharded; that kernel stays (tensor, None).
    c.mesh.axis_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),  # K/V projections and the KV cache
        ("kv", None),
        ("vocab", "tensor"),
        ("length", None),
        ("conv_in", None),
        ("conv_out", None),  # VQ convs are small and end in 3 channels: replicate
        ("codebook", None),
        ("code_dim", None),
    )

    # ---- scale options of the UMM (issue 10; models/layers.py, models/umm.py, data/packing.py) ----
    c.train.remat_policy = ""  # "" = follow train.remat ("full" / "none"); else a layers.REMAT_POLICIES name
    c.model.umm.llm.attention = "xla"  # "xla" | "cudnn" | "splash" | "explicit"; the ViT follows (cudnn -> xla)
    c.model.umm.llm.scan_unroll = 1  # decoder layers unrolled per nn.scan iteration (compile time vs step time)
    c.model.umm.loss_chunk = 512  # LM-head positions per cross-entropy tile: [B, L, vocab] logits never exist
    c.model.umm.text_loss_positions = 0  # LM head on this many text-loss positions per row (0 = all L)
    c.data.packing = False  # pack variable-length examples into rows with segment ids (data/packing.py)
    c.data.packing_bins = 8  # open rows of the first-fit packer
    c.data.packing_max_segments = 4  # examples per packed row (each brings its ViT and target image slot)
    c.mesh.axis_rules = c.mesh.axis_rules + (("layers", None),)  # the scanned-layer axis of stacked params

    # ---- checkpointing ----
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.checkpoint.best_metric = ""  # e.g. "eval/miou"; "" = keep latest only
    c.checkpoint.best_mode = "max"  # "max" | "min"
    c.checkpoint.async_save = True
    # Save the starting state (fresh init or init_from) as step 0, as MaxText does: a run whose
    # first updates diverge still leaves a finite checkpoint to restart from.
    c.checkpoint.save_initial = True

    # ---- evaluation ----
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0 = only at the end
    c.eval.num_examples = 256
    c.eval.split = "test"
    # UMM evaluation suite (sgt_jax/eval/umm_eval.py; `tools/evaluate.py --workdir=<umm run>
    # --config.eval.umm.mcq_items=16`). parts from EVAL_PARTS, splits from SPLITS.
    # Budgets are small by default so three runs evaluate in minutes on a 2-core CPU.
    c.eval.umm = ml_collections.ConfigDict()
    c.eval.umm.parts = ("cvbench", "geneval", "segmentation", "probes", "attention")
    c.eval.umm.splits = ("test", "heldout")  # Shapes World splits for CV-Bench, GenEval and segmentation
    c.eval.umm.seed = 0  # which scenes / prompts (fixed across runs so runs are comparable)
    c.eval.umm.batch_size = 16
    c.eval.umm.mcq_items = 500  # items per CV-Bench task and split (95% interval ~ +-4 points; demo quick: 64)
    c.eval.umm.mcq_method = "likelihood"  # answer log-likelihood | greedy "generate" + parsing | "both"
    # Evidence block (issue 12): controls that make a CV-Bench score readable.
    c.eval.umm.mcq_circular = True  # MMBench CircularEval: ask every rotation of the options
    c.eval.umm.mcq_blind = True  # blind control: the same items with a flat grey image
    c.eval.umm.geneval_prompts_per_tag = 50  # GenEval analogue: 50 prompts x 4 images per tag
    c.eval.umm.geneval_images_per_prompt = 4
    c.eval.umm.guidance_scale = 5.0  # GenEval sampling (Janus defaults: CFG 5, temperature 1)
    c.eval.umm.temperature = 1.0
    c.eval.umm.top_k = 0
    c.eval.umm.top_p = 1.0
    c.eval.umm.seg_images = 200  # SGT inference image -> instance mask, scored by mIoU
    c.eval.umm.seg_guidance_scale = 1.0  # CFG on the instruction (the image is never dropped)
    c.eval.umm.seg_temperature = 1.0
    c.eval.umm.seg_top_k = 1  # 1 = greedy masks
    c.eval.umm.probe_train_scenes = 256  # linear probes: fit on train scenes ...
    c.eval.umm.probe_test_scenes = 128  # ... and score on test scenes
    c.eval.umm.probe_steps = 100  # L-BFGS iterations per probe
    c.eval.umm.probe_l2 = 1e-3
    c.eval.umm.attn_items = 32  # rows per attention analysis (understanding and generation)
    c.eval.umm.attn_query_tokens = 4  # last question tokens whose attention to the image is measured
    return c


# ---------------------------------------------------------------------------------------------
# config files and their options
# ---------------------------------------------------------------------------------------------
def _closest(name: str, allowed: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _option_value(key: str, default: Any, text: str, arg: str) -> Any:
    where = f"config option '{key}' = {text!r} (in {arg!r})"
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where} is not allowed; allowed: a bool (true/false), or the bare name for true")
    try:
        value = type(default)(text)
    except ValueError:
        raise ConfigError(f"{where} is not allowed; allowed: a {type(default).__name__} like {default!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} is not allowed; allowed: a finite number")
    return value


def comma_items(text: str | None, sep: str = "=") -> list[tuple[str, bool, str]]:
    """"a=1, b ,c=x" -> [("a", True, "1"), ("b", False, ""), ("c", True, "x")]: the comma lists
    config options and `model.vq.target_mix` ("kind:weight") are written in."""
    out = []
    for part in (text or "").split(","):
        if part.strip():
            key, eq, value = part.strip().partition(sep)
            out.append((key.strip(), bool(eq), value.strip()))
    return out


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
    """Typed config-file options (big_vision's `parse_arg` idea): `parse_arg("smoke,steps=20",
    smoke=False, steps=0)` -> {smoke: True, steps: 20}. Every option has a default whose type
    converts the text; a bare name sets a bool option to True. An option not in `spec` is a
    ConfigError naming the closest valid one (`smok` -> `smoke`)."""
    out = ml_collections.ConfigDict(dict(spec))
    for key, eq, text in comma_items(arg):
        if key not in spec:
            raise ConfigError(f"unknown config option {key!r} (in {arg!r}){_closest(key, sorted(spec))} "
                              f"allowed: {sorted(spec) or 'none'}")
        if not eq:
            if not isinstance(spec[key], bool):
                raise ConfigError(f"config option {key!r} (in {arg!r}) needs a value: {key}=<{type(spec[key]).__name__}>")
            out[key] = True
        else:
            out[key] = _option_value(key, spec[key], text, arg)
    return out


def format_arg(options: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """The inverse of `parse_arg` for the options that differ from `spec` (how a config file passes
    its options on to the file it builds on)."""
    parts = []
    for key, value in options.items():
        if key in spec and value == spec[key]:
            continue
        parts.append(key if value is True else f"{key}={value}")
    return ",".join(parts)


def config_module(path: str, relative_to: str | None = None) -> ModuleType:
    """Import an experiment file (configs/ is a folder of files, not a package) by path.

    `relative_to` (a config's own `__file__`) lets one config build on a sibling: `config_module(
    "base_shapes.py", __file__).get_config(...)`.
    """
    if relative_to is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    name = "sgt_configs_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no experiment config at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """"configs/x.py[:arg]" -> get_config(arg), as `--config=` reads it (not finalized: overrides come next)."""
    path, _, arg = spec.partition(":")
    return config_module(path).get_config(arg or None)


# A comma starts a new assignment only when "dotted.name=" follows, so tuple values keep their commas.
_ASSIGNMENT_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w.]*\s*=)")


def parse_assignments(text: str) -> dict[str, Any]:
    """"train.remat=True,mesh.shape=(1,-1,1)" -> {"train.remat": True, "mesh.shape": (1, -1, 1)}:
    values are Python literals, anything else a string (how tools/bench.py variants and
    tools/dry_run.py --set name several fields at once; each is then set with `set_fields`)."""
    out: dict[str, Any] = {}
    for part in _ASSIGNMENT_SPLIT.split(text.strip()):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"config assignment {part!r} is not field=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def unknown_field(cfg: ml_collections.ConfigDict, key: str, value: Any) -> str | None:
    """The error line for a dotted field `key` that `cfg` lacks (naming the field, the value, the
    closest valid name and what its section holds), or None when the field exists."""
    node, walked = cfg, []
    for part in key.split("."):
        if isinstance(node, ml_collections.ConfigDict) and part in node:
            node = node[part]
            walked.append(part)
            continue
        where = ".".join(walked)
        if not isinstance(node, ml_collections.ConfigDict):
            return f"unknown config field '{key}' (value {value!r}): '{where}' is a value, not a section"
        allowed = sorted(node.keys())
        return (f"unknown config field '{key}' (value {value!r}){_closest(part, allowed)}; "
                f"fields of '{where or 'the config'}': {allowed}")
    return None


def set_fields(cfg: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Set dotted fields in place ({"optim.lr": 3e-4}); each must exist. For programs that build
    config variants (bench, dry run) the way `--config.x=` flags do."""
    for key, value in values.items():
        bad = unknown_field(cfg, key, value)
        if bad:
            raise ConfigError(bad)
        *sections, leaf = key.split(".")
        node = cfg
        for s in sections:
            node = node[s]
        if isinstance(node[leaf], bool) and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        with node.ignore_type():
            node[leaf] = value
    return cfg


# ---------------------------------------------------------------------------------------------
# derived fields
# ---------------------------------------------------------------------------------------------
def _round_up(n: int, m: int = SEQ_LEN_MULTIPLE) -> int:
    return -(-int(n) // m) * m


def _positive_ints(*values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def umm_dims(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Static sizes of the UMM sequence: the ViT grid (from `model.umm.vit`; image_size 0 = the data's)
    and the VQ code grid (from `model.vq.downsample` and `data.image_size`). The one definition the
    data, the model, the stage and the sampler use."""
    vit = cfg.model.umm.vit
    vit_size = int(vit.image_size) if int(vit.image_size) > 0 else int(cfg.data.image_size)
    grid = int(cfg.data.image_size) // max(int(cfg.model.vq.downsample), 1)
    return {"num_vit_tokens": (vit_size // max(int(vit.patch_size), 1)) ** 2, "vit_image_size": vit_size,
            "num_codes": grid * grid, "image_size": int(cfg.data.image_size)}


def task_kind(task: str) -> str:
    """"understanding" | "t2i" | "proxy" for a name of TASKS."""
    return "proxy" if task.startswith("proxy_") else task


def row_lengths(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Positions a row of each task of TASKS needs: structural tokens + image spans + text room."""
    d, data = umm_dims(cfg), cfg.data
    v, n = d["num_vit_tokens"], d["num_codes"]
    need = {"understanding": ROW_TOKENS["understanding"] + v + int(data.answer_room),
            "t2i": ROW_TOKENS["t2i"] + n + int(data.prompt_room),
            "proxy": ROW_TOKENS["proxy"] + v + n + int(data.instruction_room)}
    return {t: need[task_kind(t)] for t in TASKS}


def _derive(cfg, path: str, value: int, unset: int, rule: str, hint: str = "") -> None:
    *sections, leaf = path.split(".")
    node = cfg
    for s in sections:
        node = node[s]
    current = node[leaf]
    if current not in (unset, value):
        raise ConfigError(
            f"config field '{path}' = {current!r} is derived and cannot be set by hand: it is {rule} = {value}. "
            f"Set the fields it is derived from instead (leave '{path}' at {unset!r}){hint}")
    node[leaf] = value


DERIVED_FIELDS = ("model.umm.codebook_size", "model.umm.num_codes", "data.max_seq_len",
                  "train.steps (when train.num_examples > 0)")


def finalize(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Derive DERIVED_FIELDS in place after all overrides (and return cfg). Idempotent: a field that
    already holds its derived value is fine, any other hand-set value is a ConfigError naming it.
    Inputs of the wrong type are left for `validate` to report."""
    u, v, d = cfg.model.umm, cfg.model.vq, cfg.data
    if _positive_ints(v.codebook_size):
        _derive(cfg, "model.umm.codebook_size", int(v.codebook_size), 0, "model.vq.codebook_size")
    if _positive_ints(d.image_size, v.downsample):
        _derive(cfg, "model.umm.num_codes", umm_dims(cfg)["num_codes"], 0, "(data.image_size / model.vq.downsample)^2")
    tasks = [t for t in dict(d.mixture) if t in TASKS]
    if tasks and _positive_ints(d.image_size, v.downsample, u.vit.patch_size, d.answer_room, d.prompt_room,
                                d.instruction_room):
        need = row_lengths(cfg)
        _derive(cfg, "data.max_seq_len", _round_up(max(need[t] for t in tasks)), 0,
                f"the longest row of the mixed tasks {sorted(tasks)} rounded up to {SEQ_LEN_MULTIPLE}")
    n = cfg.train.num_examples
    if _positive_ints(n, cfg.train.batch_size):
        _derive(cfg, "train.steps", -(-int(n) // int(cfg.train.batch_size)), -1,
                f"ceil(train.num_examples {n} / train.batch_size {cfg.train.batch_size})",
                ", or set train.num_examples=0 to give train.steps directly")
    return cfg


# ---------------------------------------------------------------------------------------------
# configs saved with a run
# ---------------------------------------------------------------------------------------------
# Dict-valued fields whose keys are free (checked by a rule instead of the schema).
FREE_KEYS = ("data.mixture", "data.sources", "data.manual_dirs")
# Fields older runs saved that the schema no longer has; dropped when such a run is loaded.
RETIRED_FIELDS = ("model.vq.gan_start_step",)


def _merge(cfg: ml_collections.ConfigDict, saved: Mapping[str, Any], prefix: str) -> None:
    for key, value in saved.items():
        path = prefix + key
        if path in RETIRED_FIELDS:
            continue
        current = cfg[key] if key in cfg else None
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, Mapping) and path not in FREE_KEYS:
            _merge(current, value, path + ".")
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = _tuplify(value)
        with cfg.ignore_type():
            cfg[key] = value


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def from_saved(saved: Mapping[str, Any] | str) -> ml_collections.ConfigDict:
    """The config a run saved (its JSON) over the current defaults. It was finalized when it was
    saved, so its derived fields are kept as they are (not re-derived)."""
    cfg = default_config()
    _merge(cfg, json.loads(saved) if isinstance(saved, str) else saved, "")
    return cfg


def is_finalized(cfg: ml_collections.ConfigDict) -> bool:
    return int(cfg.data.max_seq_len) > 0 and int(cfg.model.umm.num_codes) > 0 and int(cfg.train.steps) > 0


# ---------------------------------------------------------------------------------------------
# field rules (one field each) and the rules that need only this module
# ---------------------------------------------------------------------------------------------
_CHOICES: dict[str, Sequence[Any]] = {
    "stage": STAGES,
    "model.vq.family": ("vit", "conv", "llamagen"),
    "model.umm.vit.pos": ("learned", "sincos"),
    "model.vq.recon_loss": ("l1", "l2"),
    "optim.schedule": ("constant", "cosine"),
    "train.compute_dtype": ("float32", "bfloat16"),
    "checkpoint.best_mode": ("max", "min"),
    "eval.umm.mcq_method": ("likelihood", "generate", "both"),
    "data.mixing": ("rows", "batches"),
    "data.world": WORLDS,
}
# Tuple fields whose every element comes from a fixed set.
_ELEMENT_CHOICES: dict[str, Sequence[Any]] = {
    "eval.umm.parts": EVAL_PARTS,
    "eval.umm.splits": SPLITS,
}
_NUMBER = (int, float)


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, _NUMBER) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    if default is None:
        return True
    return isinstance(value, type(default))


def _fail(path: str, value: Any, allowed: Any) -> None:
    raise ConfigError(f"config field '{path}' = {value!r} is not allowed; allowed: {allowed}")


def _check_schema(schema: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, prefix: str) -> None:
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(
                f"unknown config field '{path}' (value {cfg[key]!r}){_closest(key, sorted(schema.keys()))} "
                f"allowed fields under '{prefix.rstrip('.') or '<root>'}': {sorted(schema.keys())}")
        default, value = schema[key], cfg[key]
        if path in FREE_KEYS:
            continue
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config field '{path}' must be a section, got {value!r}")
            _check_schema(default, value, path + ".")
            continue
        if not _type_ok(default, value):
            raise ConfigError(
                f"config field '{path}' has type {type(value).__name__} (value {value!r}); "
                f"expected {type(default).__name__} like the default {default!r}")
        if isinstance(value, float) and not math.isfinite(value):
            _fail(path, value, "a finite number")
        if path in _CHOICES and value not in _CHOICES[path]:
            _fail(path, value, list(_CHOICES[path]))
        if path in _ELEMENT_CHOICES:
            bad = [x for x in value if x not in _ELEMENT_CHOICES[path]]
            if bad or not value:
                _fail(path, value, f"a non-empty tuple of {list(_ELEMENT_CHOICES[path])} (unknown: {bad})")


def check_fields(cfg: ml_collections.ConfigDict) -> None:
    """Unknown fields, wrong types, non-finite numbers and closed choices, by name."""
    _check_schema(default_config(), cfg, "")


def _get(cfg, path: str):
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


_POSITIVE = ("optim.lr", "train.batch_size", "optim.grad_accum_steps", "train.log_every", "checkpoint.keep",
             "checkpoint.every_steps", "model.vq.codebook_size", "data.answer_room", "data.prompt_room",
             "data.instruction_room", "data.packing_bins", "data.packing_max_segments")
_NON_NEGATIVE = ("train.num_examples", "optim.warmup_steps", "optim.weight_decay", "model.vq.gan_weight",
                 "data.num_workers", "eval.num_examples", "eval.every_steps")


def check_core(cfg: ml_collections.ConfigDict) -> None:
    """Rules that need only this module: ranges, the task mixture, mesh rules, derived fields set."""
    mixture = dict(cfg.data.mixture)
    if not mixture:
        _fail("data.mixture", mixture, f"a non-empty dict over {list(TASKS)}")
    for name, weight in mixture.items():
        if name not in TASKS:
            _fail(f"data.mixture.{name}", weight, f"task names {list(TASKS)}")
        if (not isinstance(weight, _NUMBER) or isinstance(weight, bool) or not math.isfinite(weight)
                or weight <= 0):
            _fail(f"data.mixture.{name}", weight, "a finite number > 0")
    d = cfg.data
    if d.image_size < 16 or d.image_size % 16:
        _fail("data.image_size", d.image_size, "a multiple of 16, >= 16")
    if not 1 <= d.min_objects <= d.max_objects:
        _fail("data.min_objects", d.min_objects, f"1 <= min_objects <= max_objects ({d.max_objects})")
    if not 0.0 <= d.cond_dropout < 1.0:
        _fail("data.cond_dropout", d.cond_dropout, "0 <= p < 1")
    if not 0.0 <= d.caption_fraction <= 1.0:
        _fail("data.caption_fraction", d.caption_fraction, "0 <= fraction <= 1")
    if d.text_loss_weight < 0 or d.gen_loss_weight < 0 or d.text_loss_weight + d.gen_loss_weight <= 0:
        _fail("data.text_loss_weight/gen_loss_weight", (d.text_loss_weight, d.gen_loss_weight),
              "weights >= 0, not both 0")
    if d.image_size % cfg.model.vq.downsample:
        _fail("model.vq.downsample", cfg.model.vq.downsample, f"a divisor of data.image_size ({d.image_size})")
    if cfg.model.vq.downsample not in (4, 8, 16):
        _fail("model.vq.downsample", cfg.model.vq.downsample, [4, 8, 16])
    for path in _POSITIVE:
        if _get(cfg, path) <= 0:
            _fail(path, _get(cfg, path), "a value > 0")
    for path in _NON_NEGATIVE:
        if _get(cfg, path) < 0:
            _fail(path, _get(cfg, path), "a value >= 0")
    if cfg.train.steps <= 0:
        _fail("train.steps", cfg.train.steps,
              "a value > 0 (or train.num_examples > 0 and sgt_jax.config.finalize(cfg) to derive it)")
    if not is_finalized(cfg):
        raise ConfigError("the config was not finalized: call sgt_jax.config.finalize(cfg) after all overrides "
                          f"(it derives {', '.join(DERIVED_FIELDS)})")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        _fail("optim.ema_decay", cfg.optim.ema_decay, "0 (off) or 0 < decay < 1")
    if cfg.optim.clip_norm < 0:
        _fail("optim.clip_norm", cfg.optim.clip_norm, "0 (off) or > 0")
    if not 0.0 <= cfg.optim.end_lr_fraction <= 1.0:
        _fail("optim.end_lr_fraction", cfg.optim.end_lr_fraction, "0 <= fraction <= 1")
    if cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps >= cfg.train.steps:
        _fail("optim.warmup_steps", cfg.optim.warmup_steps,
              f"fewer than train.steps ({cfg.train.steps}) with the cosine schedule")
    rule_names = [r[0] for r in cfg.mesh.axis_rules]
    for name, target in cfg.mesh.axis_rules:
        targets = target if isinstance(target, (tuple, list)) else (target,)
        for t in targets:
            if t is not None and t not in MESH_AXES:
                _fail(f"mesh.axis_rules[{name}]", target, f"mesh axes {list(MESH_AXES)} or None")
    pairs = [(name, tuple(t) if isinstance(t, list) else t) for name, t in cfg.mesh.axis_rules]
    if len(set(pairs)) != len(pairs):
        _fail("mesh.axis_rules", rule_names, "no (logical axis, mesh axes) rule twice (a name may repeat with "
              "another target as an ordered fallback)")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill the single -1 entry of a (data, fsdp, tensor) shape from the device count."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"config field 'mesh.shape' = {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"config field 'mesh.shape' = {shape}: entries must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"config field 'mesh.shape' = {shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    total = math.prod(shape)
    if total != num_devices:
        raise ConfigError(
            f"config field 'mesh.shape' = {shape} needs {total} devices but {num_devices} are available; "
            f"allowed: shapes whose product is {num_devices} (use -1 for one axis)")
    return shape


def check_devices(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """The mesh against the device count, and the batch against the data-parallel width."""
    shape = resolve_mesh_shape(cfg.mesh.shape, num_devices)
    data_parallel = shape[0] * shape[1]
    accum = cfg.optim.grad_accum_steps
    if cfg.train.batch_size % accum:
        _fail("train.batch_size", cfg.train.batch_size, f"a multiple of optim.grad_accum_steps ({accum})")
    if (cfg.train.batch_size // accum) % data_parallel:
        _fail("train.batch_size", cfg.train.batch_size,
              f"a multiple of data x fsdp = {data_parallel} (x grad_accum_steps {accum})")
