"""The config schema: every field an experiment may set, and the checks run before anything compiles.

Each experiment file in `configs/` starts from `default_config()` and overrides fields. Because the
defaults define the full schema, `validate()` can reject unknown fields and wrong types by name (as
MaxText does with base.yml), and then run semantic checks (mesh vs devices, batch divisibility,
task names, mixture weights) that need more than one field.
"""
from __future__ import annotations

import ast
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
    c.data.data_dir = ""  # TFDS data_dir; "" = <workdir>/../data or built on demand
    c.data.image_size = 64
    c.data.min_objects = 1
    c.data.max_objects = 4
    c.data.train_size = 4096
    c.data.validation_size = 256
    c.data.test_size = 256
    c.data.heldout_size = 256
    # Task mixture weights by batch fraction; names in TASKS. SGT default is 2 proxy : 1 VQA.
    c.data.mixture = ml_collections.ConfigDict({"understanding": 1.0})
    c.data.shuffle_seed = 0
    c.data.num_workers = 0  # grain worker processes (0 = in-process)
    c.data.cond_dropout = 0.1  # drop the text condition of t2i / proxy samples (CFG)
    c.data.max_seq_len = 128
    c.data.tokenizer_dir = ""  # "" = the Shapes World tokenizer built next to the data

    # ---- model ----
    c.model = ml_collections.ConfigDict()
    c.model.vq = ml_collections.ConfigDict()
    c.model.vq.family = "vit"  # "vit" | "conv"
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
    c.model.vq.dead_code_threshold = 1e-3
    c.model.umm = ml_collections.ConfigDict()

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

    # ---- mesh and sharding ----
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    # Logical axis name -> mesh axis (or None). Covers parameters and activations.
    c.mesh.axis_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
        ("length", None),
        ("conv_in", None),
        ("conv_out", "tensor"),
        ("codebook", None),
        ("code_dim", None),
    )

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


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
_CHOICES: dict[str, Sequence[Any]] = {
    "stage": STAGES,
    "model.vq.family": ("vit", "conv"),
    "model.vq.recon_loss": ("l1", "l2"),
    "optim.schedule": ("constant", "cosine"),
    "train.compute_dtype": ("float32", "bfloat16"),
    "checkpoint.best_mode": ("max", "min"),
}
# Dict-valued fields whose keys are free (checked by a semantic rule instead of the schema).
_FREE_KEYS = ("data.mixture", "model.umm")

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
    if len(set(rule_names)) != len(rule_names):
        fail("mesh.axis_rules", rule_names, "each logical axis named once")
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
    for check in _EXTRA_CHECKS:
        check(cfg)
    return cfg
