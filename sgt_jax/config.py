"""The config schema: every field an experiment may set, and the checks run before anything compiles.

Each experiment file in `configs/` starts from `default_config()` and overrides fields. Because the
defaults define the full schema, `validate()` can reject unknown fields and wrong types by name (as
MaxText does with base.yml), and then run semantic checks (mesh vs devices, batch divisibility,
task names, mixture weights) that need more than one field.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from types import ModuleType
from typing import Any, Callable, Sequence

import ml_collections

STAGES = ("vq", "umm")
PROXIES = ("segmentation", "semantic", "depth", "edge", "reconstruction", "mae")
TASKS = ("understanding", "t2i") + tuple(f"proxy_{p}" for p in PROXIES)
MESH_AXES = ("data", "fsdp", "tensor")


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
    c.data.max_seq_len = 128
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
    c.model.vq.gan_start_step = 0
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
    # and train.remat; cross-field rules live in umm.check_config (registered with register_check).
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
    c.model.umm.codebook_size = 1024  # must equal model.vq.codebook_size
    c.model.umm.num_codes = 64  # code positions per generated image: (data.image_size / vq.downsample)^2
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
    c.train.steps = 1000
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
    # dim of the same array is skipped (flax's priority rules), e.g. the generation head's
    # ("mlp", "vocab") kernel gets mlp -> tensor, vocab -> fsdp.
    c.mesh.axis_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),  # K/V projections and the KV cache
        ("kv", None),
        ("vocab", "tensor"),
        ("vocab", "fsdp"),  # fallback when tensor is taken (generation head fc2)
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
    c.mesh.axis_rules = c.mesh.axis_rules + (("layers", None),)  # the scanned-layer axis of stacked params

    # ---- checkpointing ----
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.checkpoint.best_metric = ""  # e.g. "eval/miou"; "" = keep latest only
    c.checkpoint.best_mode = "max"  # "max" | "min"
    c.checkpoint.async_save = True

    # ---- evaluation ----
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0 = only at the end
    c.eval.num_examples = 256
    c.eval.split = "test"
    # UMM evaluation suite (sgt_jax/eval/umm_eval.py, `tools/evaluate.py --workdir=<umm run>`).
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


def parse_arg(arg: str | None) -> ml_collections.ConfigDict:
    """Parse big_vision style `key=value,flag` strings: "smoke,proxy=segmentation" -> {smoke: True, proxy: ...}."""
    out = ml_collections.ConfigDict()
    if not arg:
        return out
    for part in arg.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            key, value = part.split("=", 1)
            try:
                out[key.strip()] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key.strip()] = value
        else:
            out[part] = True
    return out


def config_module(path: str, relative_to: str | None = None) -> ModuleType:
    """Import an experiment file (configs/ is a folder of files, not a package) by path.

    `relative_to` (a config's own `__file__`) lets one config build on a sibling: `config_module(
    "base_shapes.py", __file__).get_config(...)`.
    """
    if relative_to is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    name = "sgt_configs_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no experiment config at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# validation
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
}
# Dict-valued fields whose keys are free (checked by a semantic rule instead of the schema).
_FREE_KEYS = ("data.mixture", "data.sources", "data.manual_dirs")

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


def _check_schema(schema: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, prefix: str) -> None:
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(
                f"unknown config field '{path}' (value {cfg[key]!r}); allowed fields under "
                f"'{prefix.rstrip('.') or '<root>'}': {sorted(schema.keys())}")
        default, value = schema[key], cfg[key]
        if path in _FREE_KEYS:
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
        if path in _CHOICES and value not in _CHOICES[path]:
            raise ConfigError(f"config field '{path}' = {value!r} is not allowed; allowed: {list(_CHOICES[path])}")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill the single -1 entry of a (data, fsdp, tensor) shape from the device count."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"config field 'mesh.shape' = {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"config field 'mesh.shape' = {shape}: entries must be positive, with at most one -1")
    known = 1
    for s in shape:
        if s != -1:
            known *= s
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"config field 'mesh.shape' = {shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    total = 1
    for s in shape:
        total *= s
    if total != num_devices:
        raise ConfigError(
            f"config field 'mesh.shape' = {shape} needs {total} devices but {num_devices} are available; "
            f"allowed: shapes whose product is {num_devices} (use -1 for one axis)")
    return shape


def _check_semantics(cfg: ml_collections.ConfigDict, num_devices: int | None) -> None:
    def fail(path, value, allowed):
        raise ConfigError(f"config field '{path}' = {value!r} is not allowed; allowed: {allowed}")

    mixture = dict(cfg.data.mixture)
    if not mixture:
        fail("data.mixture", mixture, f"a non-empty dict over {list(TASKS)}")
    for name, weight in mixture.items():
        if name not in TASKS:
            fail(f"data.mixture.{name}", weight, f"task names {list(TASKS)}")
        if not isinstance(weight, _NUMBER) or isinstance(weight, bool) or weight <= 0:
            fail(f"data.mixture.{name}", weight, "a number > 0")
    if cfg.data.image_size < 16 or cfg.data.image_size % 16:
        fail("data.image_size", cfg.data.image_size, "a multiple of 16, >= 16")
    if not 1 <= cfg.data.min_objects <= cfg.data.max_objects:
        fail("data.min_objects", cfg.data.min_objects, f"1 <= min_objects <= max_objects ({cfg.data.max_objects})")
    if not 0.0 <= cfg.data.cond_dropout < 1.0:
        fail("data.cond_dropout", cfg.data.cond_dropout, "0 <= p < 1")
    if cfg.data.image_size % cfg.model.vq.downsample:
        fail("model.vq.downsample", cfg.model.vq.downsample, f"a divisor of data.image_size ({cfg.data.image_size})")
    if cfg.model.vq.downsample not in (4, 8, 16):
        fail("model.vq.downsample", cfg.model.vq.downsample, [4, 8, 16])
    for path in ("optim.lr", "train.steps", "train.batch_size", "optim.grad_accum_steps", "train.log_every",
                 "checkpoint.keep", "checkpoint.every_steps", "model.vq.codebook_size"):
        section, _, leaf = path.rpartition(".")
        value = cfg
        for part in path.split("."):
            value = value[part]
        if value <= 0:
            fail(path, value, "a value > 0")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        fail("optim.ema_decay", cfg.optim.ema_decay, "0 (off) or 0 < decay < 1")
    if cfg.optim.clip_norm < 0:
        fail("optim.clip_norm", cfg.optim.clip_norm, "0 (off) or > 0")
    rule_names = [r[0] for r in cfg.mesh.axis_rules]
    for name, target in cfg.mesh.axis_rules:
        targets = target if isinstance(target, (tuple, list)) else (target,)
        for t in targets:
            if t is not None and t not in MESH_AXES:
                fail(f"mesh.axis_rules[{name}]", target, f"mesh axes {list(MESH_AXES)} or None")
    pairs = [(name, tuple(t) if isinstance(t, list) else t) for name, t in cfg.mesh.axis_rules]
    if len(set(pairs)) != len(pairs):
        fail("mesh.axis_rules", rule_names, "no (logical axis, mesh axes) rule twice (a name may repeat with "
             "another target as an ordered fallback)")
    if num_devices is not None:
        shape = resolve_mesh_shape(cfg.mesh.shape, num_devices)
        data_parallel = shape[0] * shape[1]
        micro = cfg.train.batch_size // cfg.optim.grad_accum_steps
        if cfg.train.batch_size % cfg.optim.grad_accum_steps:
            fail("train.batch_size", cfg.train.batch_size,
                 f"a multiple of optim.grad_accum_steps ({cfg.optim.grad_accum_steps})")
        if micro % data_parallel:
            fail("train.batch_size", cfg.train.batch_size,
                 f"a multiple of data x fsdp = {data_parallel} (x grad_accum_steps {cfg.optim.grad_accum_steps})")


_EXTRA_CHECKS: list[Callable[[ml_collections.ConfigDict], None]] = []


def register_check(fn: Callable[[ml_collections.ConfigDict], None]) -> Callable:
    """Modules that own a config section (e.g. the UMM model) register extra semantic checks here."""
    _EXTRA_CHECKS.append(fn)
    return fn


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
    """Raise ConfigError naming the first bad field; return cfg unchanged when everything holds.

    `num_devices` enables the mesh and batch checks; pass `jax.device_count()` before building the mesh.
    """
    _check_schema(default_config(), cfg, "")
    _check_semantics(cfg, num_devices)
    if cfg.stage == "umm":
        import sgt_jax.data.datasets  # noqa: F401  (register the real data-source checks ...)
        import sgt_jax.data.sequences  # noqa: F401  (... the sequence-length checks ...)
        import sgt_jax.models.umm  # noqa: F401  (... and the model's)
    for check in _EXTRA_CHECKS:
        check(cfg)
    return cfg
