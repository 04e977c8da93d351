"""Measure the train step instead of asserting speed in tests: wall-clock timing of the real jitted
step for several config variants side by side, and per-device memory of an AOT compile on abstract
inputs (MaxText's train_compile idea). The library behind tools/bench.py and tools/dry_run.py.

Both build the step with `sgt_jax.train.trainer.build_trainer`, the function the training loop
uses, so what is measured is what trains. Configs come from `sgt_jax.config.load_config` and
variants set fields with `sgt_jax.config.set_fields` (values parsed like `--config.x=` flags).
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Any, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from sgt_jax import checks
from sgt_jax.config import parse_assignments, resolve_mesh_shape, set_fields
from sgt_jax.train import flops as flops_lib
from sgt_jax.train import optim, sharding
from sgt_jax.train.trainer import Trainer, build_trainer

GiB = 1024 ** 3


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[tuple[str, Any], ...] = ()


def parse_variant(text: str) -> Variant:
    """"bf16:train.compute_dtype=bfloat16,train.remat=True" -> Variant; "base" (no colon) = no overrides."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"variant {text!r} needs a name before ':'")
    return Variant(name, tuple(parse_assignments(rest).items()))


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[tuple[str, Any]]) -> ml_collections.ConfigDict:
    """A copy of `cfg` with dotted fields set; every field must already exist (`config.set_fields`)."""
    return set_fields(copy.deepcopy(cfg), dict(overrides))


def build(cfg: ml_collections.ConfigDict, *, name: str = "", materialize: bool = True, stage=None,
          devices=None) -> Trainer:
    """The entry point's one finalize + validate (on a copy), then `build_trainer`. `devices` (default:
    all) may be the compile-only devices of a TPU topology (train/aot.py)."""
    cfg = checks.prepare(copy.deepcopy(cfg), jax.device_count() if devices is None else len(devices))
    return build_trainer(cfg, stage=stage, materialize=materialize, name=name, devices=devices)


Built = Trainer  # what the timing and dry-run code below calls a built variant


def memory_stats(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled executable (XLA's memory analysis); {} if the backend has none.

    peak = arguments + temporaries + outputs not aliased to (donated) arguments.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = out["argument"] + out["temp"] + max(out["output"] - out["alias"], 0)
    return out


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runner:
    """A materialised, compiled step plus its timings (seconds per step)."""
    built: Built
    compiled: Any
    state: Any
    batches: Iterator[dict]
    compile_s: float
    memory: dict[str, int]
    times: list[float] = dataclasses.field(default_factory=list)
    data_times: list[float] = dataclasses.field(default_factory=list)
    starts: list[float] = dataclasses.field(default_factory=list)  # perf_counter at each timed round
    last_loss: float = float("nan")
    total_skips: float = 0.0  # the state's cumulative count after the last run
    skips_at_start: float = 0.0  # ... when timing began (after warm-up)
    _step: int = 0

    @property
    def skipped(self) -> int:
        """Non-finite (skipped) steps while timed: those skip the optimizer update, so the timing
        would not be representative of training."""
        return int(round(self.total_skips - self.skips_at_start))

    def run(self, steps: int = 1, record: bool = True) -> float:
        """Run `steps` steps back to back (the batch is fetched before the clock starts) and
        return seconds per step; the last step's metrics are fetched after the clock stops."""
        t_data = time.perf_counter()
        batch = next(self.batches)
        jax.block_until_ready(batch)
        t_data = time.perf_counter() - t_data
        key = jax.random.key(int(self.built.cfg.seed))
        rngs = [jax.random.fold_in(key, self._step + i) for i in range(steps)]
        self._step += steps
        with self.built.context():
            t0 = time.perf_counter()
            metrics = None
            for rng in rngs:
                self.state, metrics = self.compiled(self.state, batch, rng)
            jax.block_until_ready((self.state, metrics))
            dt = (time.perf_counter() - t0) / steps
        m = jax.device_get(metrics)
        self.last_loss = float(m["loss"])
        self.total_skips = float(m["total_skips"])
        if record:
            self.starts.append(t0)
            self.times.append(dt)
            self.data_times.append(t_data)
        return dt


def _fixed_batches(built: Built) -> Iterator[dict]:
    """The stage's dummy batch as global arrays, reused every step (only the state is donated)."""
    batch = sharding.host_batch_to_global(built.stage.dummy_batch(built.global_batch), built.mesh, built.rules)
    while True:
        yield batch


def _real_batches(built: Built) -> Iterator[dict]:
    """Batches from the stage's data pipeline, cut to the keys the step declares, as global arrays."""
    from sgt_jax.train.loop import make_data_iterator  # pulls in the checkpoint stack: only when asked

    it = make_data_iterator(built.stage, built.cfg, "train")
    keys = set(built.setup.example_spec)
    while True:
        host = next(it)
        host = {k: v for k, v in host.items() if k in keys}
        yield sharding.host_batch_to_global(host, built.mesh, built.rules)


def make_runner(cfg: ml_collections.ConfigDict, *, name: str = "", real_data: bool = False, stage=None) -> Runner:
    """Build, materialise and AOT-compile one variant's step (compile time and memory recorded)."""
    built = build(cfg, name=name, materialize=True, stage=stage)
    batches = _real_batches(built) if real_data else _fixed_batches(built)
    with built.context():
        t0 = time.perf_counter()
        compiled = built.jstep.lower(*built.abstract_inputs()).compile()
        compile_s = time.perf_counter() - t0
    return Runner(built=built, compiled=compiled, state=built.setup.state, batches=batches, compile_s=compile_s,
                  memory=memory_stats(compiled))


def time_interleaved(runners: Sequence[Runner], *, warmup: int = 2, rounds: int = 5, steps_per_round: int = 1) -> None:
    """Warm every runner up, then time round-robin (A B C A B C ...) so machine noise (other jobs,
    thermal, caches) lands on every variant alike. Fills `runner.times` with `rounds` entries."""
    for r in runners:
        for _ in range(warmup):
            r.run(1, record=False)
        r.skips_at_start = r.total_skips
    for _ in range(rounds):
        for r in runners:
            r.run(steps_per_round)


@dataclasses.dataclass
class BenchRow:
    variant: str
    params: int
    trainable: int
    devices: int
    global_batch: int
    step_s_median: float
    step_s_min: float
    step_s_max: float
    n: int
    examples_per_sec: float
    tokens_per_sec: float
    tflops_per_device: float
    mfu: float
    peak_tflops: float
    ratio: float  # step time / first variant's step time
    compile_s: float
    peak_mem_gib: float
    temp_mem_gib: float
    skipped_steps: int
    data_s_median: float
    loss: float
    times_s: list[float] = dataclasses.field(default_factory=list)  # every timed round, in order

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(runners: Sequence[Runner], *, peak_tflops: float = 0.0) -> list[BenchRow]:
    """One row per runner; `peak_tflops` > 0 overrides the config's and the platform default."""
    rows: list[BenchRow] = []
    base = None
    for r in runners:
        b = r.built
        med = statistics.median(r.times)
        base = med if base is None else base
        peak = flops_lib.peak_tflops_per_device(peak_tflops if peak_tflops > 0 else float(b.cfg.train.peak_tflops_per_device))
        tp = flops_lib.throughput(steps=1, seconds=med, global_batch=b.global_batch,
                                  flops_per_example=float(b.stage.flops_per_example()),
                                  tokens_per_example=float(b.stage.tokens_per_example()),
                                  num_devices=jax.device_count(), peak_tflops=peak)
        rows.append(BenchRow(
            variant=b.name, params=b.n_params, trainable=b.n_trainable, devices=jax.device_count(),
            global_batch=b.global_batch, step_s_median=med, step_s_min=min(r.times), step_s_max=max(r.times),
            n=len(r.times), examples_per_sec=tp.get("examples_per_sec", float("nan")),
            tokens_per_sec=tp.get("tokens_per_sec", float("nan")),
            tflops_per_device=tp.get("tflops_per_device", float("nan")), mfu=tp.get("mfu", float("nan")),
            peak_tflops=peak, ratio=med / base, compile_s=r.compile_s,
            peak_mem_gib=r.memory.get("peak", 0) / GiB if r.memory else float("nan"),
            temp_mem_gib=r.memory.get("temp", 0) / GiB if r.memory else float("nan"),
            skipped_steps=r.skipped, data_s_median=statistics.median(r.data_times) if r.data_times else 0.0,
            loss=r.last_loss, times_s=list(r.times)))
    return rows


def _si(x: float) -> str:
    if not np.isfinite(x):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.3g}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


BENCH_COLUMNS = ("variant", "params", "step ms (med)", "min", "max", "ex/s", "tok/s", "TFLOP/s/dev", "MFU",
                 "time x first", "compile s", "peak GiB/dev", "skipped")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_table(rows: Sequence[BenchRow]) -> str:
    body = [(r.variant, _si(r.params), _ms(r.step_s_median), _ms(r.step_s_min), _ms(r.step_s_max),
             f"{r.examples_per_sec:.1f}", _si(r.tokens_per_sec), f"{r.tflops_per_device:.3g}",
             "-" if not np.isfinite(r.mfu) else f"{100 * r.mfu:.1f}%", f"{r.ratio:.2f}", f"{r.compile_s:.1f}",
             "-" if not np.isfinite(r.peak_mem_gib) else f"{r.peak_mem_gib:.3f}", str(r.skipped_steps))
            for r in rows]
    return markdown_table(BENCH_COLUMNS, body)


# ---------------------------------------------------------------------------------------------
# sampler timing
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SamplerRow:
    variant: str
    batch: int
    num_codes: int
    cfg_guidance: bool
    seconds_median: float
    seconds_min: float
    seconds_max: float
    n: int
    codes_per_sec: float
    images_per_sec: float
    compile_s: float
    ratio: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sampler_runner(cfg: ml_collections.ConfigDict, *, batch: int, prompt_len: int, guidance: bool, seed: int = 0):
    """-> (call() -> codes, compile seconds): `generate_codes` of a randomly initialised UMM on
    random right-padded t2i prompts (compute dtype etc. from `cfg`). Sampling cost does not depend
    on the weights, so no checkpoint is needed."""
    from sgt_jax.infer import sampler
    from sgt_jax.models import umm as umm_lib

    cfg = checks.prepare(copy.deepcopy(cfg))
    mcfg = umm_lib.UMMConfig.from_config(cfg)
    model = umm_lib.UMM(mcfg)
    seq = max(int(cfg.data.max_seq_len), 2 + mcfg.num_vit_tokens + mcfg.num_codes)
    params = jax.jit(lambda k: nn.unbox(model.init(k, umm_lib.dummy_inputs(mcfg, 1, seq))["params"]))(
        jax.random.key(seed))
    rng = np.random.default_rng(seed)
    vocab = mcfg.llm.vocab_size
    tokens = rng.integers(1, vocab, size=(batch, prompt_len)).astype(np.int32)
    mask = np.ones((batch, prompt_len), np.int32)
    mask[1::2, prompt_len // 2:] = 0  # rows of different lengths, as real prompts are
    prefix = {"tokens": tokens, "attn_mask": mask}
    uncond = {"tokens": np.zeros_like(tokens), "attn_mask": np.pad(np.ones((batch, 2), np.int32),
                                                                  ((0, 0), (0, prompt_len - 2)))} if guidance else None
    sampling = sampler.SamplingConfig(guidance_scale=5.0 if guidance else 1.0, temperature=1.0)
    calls = [0]

    def call():
        calls[0] += 1
        out = sampler.generate_codes(model, params, prefix, mcfg.num_codes, sampling,
                                     jax.random.key(calls[0]), uncond)
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    call()
    return call, time.perf_counter() - t0, mcfg.num_codes


def time_samplers(named: Sequence[tuple[str, ml_collections.ConfigDict]], *, batch: int, prompt_len: int = 32,
                  guidance: bool = True, warmup: int = 1, rounds: int = 3) -> list[SamplerRow]:
    """Image-code generation speed per variant, timed round-robin like the train step."""
    runs = []
    for name, cfg in named:
        call, compile_s, n = sampler_runner(cfg, batch=batch, prompt_len=prompt_len, guidance=guidance)
        for _ in range(warmup):
            call()
        runs.append((name, call, compile_s, n, []))
    for _ in range(rounds):
        for _, call, _, _, times in runs:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    rows, base = [], None
    for name, _, compile_s, n, times in runs:
        med = statistics.median(times)
        base = med if base is None else base
        rows.append(SamplerRow(variant=name, batch=batch, num_codes=n, cfg_guidance=guidance, seconds_median=med,
                               seconds_min=min(times), seconds_max=max(times), n=len(times),
                               codes_per_sec=batch * n / med, images_per_sec=batch / med, compile_s=compile_s,
                               ratio=med / base))
    return rows


def sampler_table(rows: Sequence[SamplerRow]) -> str:
    header = ("variant", "batch", "codes/img", "CFG", "s/batch (med)", "min", "max", "codes/s", "img/s", "x first",
              "compile s")
    body = [(r.variant, r.batch, r.num_codes, "yes" if r.cfg_guidance else "no", f"{r.seconds_median:.3f}",
             f"{r.seconds_min:.3f}", f"{r.seconds_max:.3f}", f"{r.codes_per_sec:.1f}", f"{r.images_per_sec:.2f}",
             f"{r.ratio:.2f}", f"{r.compile_s:.1f}") for r in rows]
    return markdown_table(header, body)


# ---------------------------------------------------------------------------------------------
# dry run: AOT compile on abstract inputs
# ---------------------------------------------------------------------------------------------
def _abstract_mesh(mesh_shape: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape), axis_types=(AxisType.Auto,) * len(mesh_shape))


def _shard_shape(leaf, mesh: AbstractMesh) -> tuple[int, ...]:
    """One device's shard of `leaf` with its PartitionSpec on `mesh` (`Sharding.shard_shape`)."""
    spec = getattr(getattr(leaf, "sharding", None), "spec", jax.sharding.PartitionSpec())
    return NamedSharding(mesh, spec).shard_shape(tuple(leaf.shape))


def state_bytes_per_device(abstract_state, mesh_shape: dict[str, int]) -> int:
    """Analytic per-device bytes of the sharded train state on a mesh of `mesh_shape` (which may be
    larger than the simulated one: the same PartitionSpecs on the target pod)."""
    mesh, total = _abstract_mesh(mesh_shape), 0
    for leaf in jax.tree.leaves(abstract_state):
        try:
            shape = _shard_shape(leaf, mesh)
        except ValueError:  # does not divide on this (target) mesh: count the padded shard
            shape = _shard_shape(jax.ShapeDtypeStruct(_padded(leaf, mesh_shape), leaf.dtype,
                                                      sharding=getattr(leaf, "sharding", None)), mesh)
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _padded(leaf, mesh_shape: dict[str, int]) -> tuple[int, ...]:
    """`leaf.shape` rounded up per dim to a multiple of its mesh axes (how XLA pads an uneven shard)."""
    spec = tuple(getattr(getattr(leaf, "sharding", None), "spec", ()))
    dims = list(leaf.shape)
    for i, entry in enumerate(spec):
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        n = int(np.prod([mesh_shape[a] for a in axes], dtype=np.int64)) if axes else 1
        dims[i] = -(-dims[i] // n) * n
    return tuple(dims)


@dataclasses.dataclass
class DryRunReport:
    config: str
    devices: int
    mesh: dict[str, int]
    global_batch: int
    per_device_batch: float
    params: int
    trainable: int
    compute_dtype: str
    remat: bool
    memory: dict[str, int]  # per device, from XLA
    state_bytes: int  # per device, analytic, simulated mesh
    target_devices: int
    target_mesh: dict[str, int]
    target_state_bytes: int  # per device on the target mesh
    target_peak_bytes: int  # measured peak with the state term replaced by the target's
    hbm_bytes: int
    fits: bool
    lower_s: float
    compile_s: float
    big_params: list[tuple[str, tuple[int, ...], str]]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def big_params(built: Built, k: int = 6) -> list[tuple[str, tuple[int, ...], str]]:
    """The k largest parameters: ('/'-path, shape, PartitionSpec)."""
    flat = jax.tree_util.tree_flatten_with_path(built.setup.abstract.params)[0]
    flat.sort(key=lambda pl: -int(np.prod(pl[1].shape, dtype=np.int64)))
    return [(optim.path_str(p), tuple(int(s) for s in leaf.shape), str(leaf.sharding.spec)) for p, leaf in flat[:k]]


def indivisible(abstract_tree, mesh_shape: dict[str, int]) -> list[tuple[str, tuple[int, ...], str]]:
    """Leaves whose sharded dims do not divide by their mesh axes: jit would refuse them (IndivisibleError)
    when creating the state, so list them all by path instead of failing on the first."""
    mesh, bad = _abstract_mesh(mesh_shape), []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
        try:
            _shard_shape(leaf, mesh)
        except ValueError:
            bad.append((optim.path_str(path), tuple(int(s) for s in leaf.shape), str(leaf.sharding.spec)))
    return bad


def dry_run(cfg: ml_collections.ConfigDict, *, name: str = "", target_devices: int = 0,
            hbm_gib: float = 95.0, stage=None) -> DryRunReport:
    """AOT-lower and compile the train step on ShapeDtypeStructs (no parameter is allocated) and
    report per-device memory. `target_devices` (0 = the simulated count) is the real chip count:
    the state term of the peak is recomputed for the same PartitionSpecs on that mesh (activation
    and temporary memory depend on the per-device batch, which the caller keeps equal)."""
    built = build(cfg, name=name, materialize=False, stage=stage)
    mesh_shape = {k: int(v) for k, v in built.mesh.shape.items()}
    bad = indivisible(built.setup.abstract.params, mesh_shape)
    if bad:
        raise ValueError(f"{name}: on mesh {mesh_shape} these parameters do not divide by their mesh axes "
                         f"(the real run fails the same way when it creates the state): "
                         + "; ".join(f"{p} {s} {sp}" for p, s, sp in bad[:10])
                         + (f" ... and {len(bad) - 10} more" if len(bad) > 10 else "")
                         + ". Change `mesh.axis_rules` for their logical axes or the mesh shape.")
    with built.context():
        t0 = time.perf_counter()
        lowered = built.jstep.lower(*built.abstract_inputs())
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    mem = memory_stats(compiled)
    n_dev = jax.device_count()
    target = int(target_devices) or n_dev
    target_mesh = dict(zip(mesh_shape, resolve_mesh_shape(cfg.mesh.shape, target), strict=True))
    st = state_bytes_per_device(built.setup.abstract, mesh_shape)
    st_target = state_bytes_per_device(built.setup.abstract, target_mesh)
    # The donated state is both an argument and (aliased) output; only its argument copy counts.
    peak = mem.get("peak", 0)
    target_peak = peak - st + st_target if mem else 0
    hbm = int(hbm_gib * GiB)
    return DryRunReport(
        config=name, devices=n_dev, mesh=mesh_shape, global_batch=built.global_batch,
        per_device_batch=built.global_batch / (mesh_shape["data"] * mesh_shape["fsdp"]),
        params=built.n_params, trainable=built.n_trainable, compute_dtype=str(cfg.train.compute_dtype),
        remat=bool(cfg.train.remat), memory=mem, state_bytes=st, target_devices=target, target_mesh=target_mesh,
        target_state_bytes=st_target, target_peak_bytes=target_peak, hbm_bytes=hbm,
        fits=bool(mem) and target_peak <= hbm, lower_s=t1 - t0, compile_s=t2 - t1, big_params=big_params(built))


def dry_run_text(r: DryRunReport) -> str:
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    mib = lambda b: f"{b / 2 ** 20:,.1f}"  # noqa: E731
    m = r.memory
    lines = [
        f"== {r.config}: {r.devices} simulated devices, mesh {r.mesh}, global batch {r.global_batch} "
        f"({r.per_device_batch:g}/device), {r.compute_dtype}, remat={r.remat}",
        f"params {r.params:,} total, {r.trainable:,} trainable  (lower {r.lower_s:.1f}s, compile {r.compile_s:.1f}s)",
        "largest parameters:",
        *[f"  {p:60s} {str(s):18s} {spec}" for p, s, spec in r.big_params],
        markdown_table(("per device MiB", "argument", "output", "alias", "temp", "code", "peak", "state (analytic)"),
                       [(f"simulated {r.devices}", mib(m.get("argument", 0)), mib(m.get("output", 0)),
                         mib(m.get("alias", 0)), mib(m.get("temp", 0)), mib(m.get("generated_code", 0)),
                         mib(m.get("peak", 0)), mib(r.state_bytes))]) if m else "memory analysis unavailable",
        f"target {r.target_devices} devices mesh {r.target_mesh}: state {g(r.target_state_bytes)} GiB/device, "
        f"estimated peak {g(r.target_peak_bytes)} GiB vs HBM {g(r.hbm_bytes)} GiB -> "
        f"{'FITS' if r.fits else 'DOES NOT FIT'}",
    ]
    return "\n".join(lines)
