"""Benchmark the real train step (or the image sampler) of config variants side by side.

    python tools/bench.py --config=configs/base_shapes.py \
        --variant=f32 --variant=bf16:train.compute_dtype=bfloat16 --variant=remat:train.remat=True \
        --steps=10 --warmup=2 [--real_data] [--devices=8] [--out=runs/bench/base]

Every variant's step is built as the training loop builds it (sharded state, `make_train_step`,
jit with a donated state) and AOT-compiled; after warm-up the variants are timed round-robin
(A B C A B C ...) so machine noise hits all of them alike. The table gives the median step time
(with min/max) over `--steps` timed rounds, examples/s, tokens/s, TFLOP/s per device from the
stage's analytic FLOPs, MFU against the per-platform peak (`--peak_tflops` or
`train.peak_tflops_per_device` override it; on CPU the measured matmul peak is shared by the
simulated devices), and each variant's step time relative to the first. `--sampler` times
`sgt_jax.infer.sampler.generate_codes` (codes/s, with CFG) of each variant instead.

`--suite=scale` runs the issue-10 comparisons in one go instead (tools/scale_bench.py):

    git worktree add /tmp/before f1d12ac   # the unrolled layers, for the before/after table
    python tools/bench.py --suite=scale --before_src=/tmp/before --steps=10 --warmup=2 [--out=runs/bench/scale]

A variant is `name:field=value,field=value` over the base config (which `--config.field=value`
flags change for all variants); a bare `name` is the base config itself.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import provenance  # tools/provenance.py
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file (path[:arg]).", lock_config=False)
_VARIANTS = flags.DEFINE_multi_string("variant", [], "name[:field=value,...]; repeatable. Default: one 'base'.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed rounds per variant (each times --steps_per_round steps).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per variant after compilation.")
_PER_ROUND = flags.DEFINE_integer("steps_per_round", 1, "Back-to-back steps per timed round (per-step time = mean).")
_REAL = flags.DEFINE_bool("real_data", False, "Feed batches from the stage's data pipeline instead of its dummy batch.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0 = config / platform default).")
_DEVICES = flags.DEFINE_integer("devices", 0, "Simulate this many CPU devices (0 = the real devices).")
_SAMPLER = flags.DEFINE_bool("sampler", False, "Time image-code sampling (UMM configs) instead of the train step.")
_SAMPLER_BATCH = flags.DEFINE_integer("sampler_batch", 4, "Images per sampler call.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt positions per sampler row.")
_NO_CFG = flags.DEFINE_bool("no_cfg", False, "Sampler without classifier-free guidance (no doubled batch).")
_OUT = flags.DEFINE_string("out", "", "Also write the table to OUT.json and OUT.md.")
_SUITE = flags.DEFINE_enum("suite", "", ["", "scale", "scale_small"],
                           "Run the issue-10 speed suite instead (tools/scale_bench.py; --config is then ignored): "
                           "train step, umm_1b compile time, tokens/s vs torch, CFG sampling vs HF generate. "
                           "'scale_small' shrinks every size (a quick check that the suite runs).")
_SUITE_STEPS = flags.DEFINE_list("suite_steps", ["base_shapes", "umm_1b_2layer"],
                                 "With --suite: the train-step variants it times before and after (the umm_1b "
                                 "2-layer slice takes ~200 s a step on 2 CPU cores).")
_BEFORE = flags.DEFINE_string("before_src", "", "With --suite: a checkout of the old code (e.g. `git worktree add "
                              "/tmp/before f1d12ac`) whose tools/bench.py times the same train steps first.")


def _simulate_devices(n: int) -> None:
    """Must run before jax is imported (the flag is read when the CPU backend starts)."""
    if n <= 0:
        return
    if "jax" in sys.modules:
        raise RuntimeError("--devices must be applied before jax is imported")
    flag = f"--xla_force_host_platform_device_count={n}"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(kept + [flag])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def environment() -> dict:
    import jax
    dev = jax.devices()[0]
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "jax": jax.__version__,
           "backend": jax.default_backend(), "device_kind": getattr(dev, "device_kind", str(dev)),
           "devices": jax.device_count(), "cpu_count": os.cpu_count()}
    try:
        env["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    env.update(provenance.host_cpu(), commit=provenance.git_commit())
    return env


def write_out(prefix: str, payload: dict, table: str, header: str) -> None:
    prefix = os.path.splitext(prefix)[0] if prefix.endswith((".json", ".md")) else prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(payload, f, indent=2, default=str)
    with open(prefix + ".md", "w") as f:
        f.write(header + "\n\n" + table + "\n")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _simulate_devices(_DEVICES.value)
    if _SUITE.value:
        return run_suite(small=_SUITE.value == "scale_small")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (unless --suite is given)")
    import bench_lib as bench  # tools/bench_lib.py: imports jax, so after the device flag

    variants = [bench.parse_variant(v) for v in (_VARIANTS.value or ["base"])]
    if len({v.name for v in variants}) != len(variants):
        raise app.UsageError(f"variant names must be unique: {[v.name for v in variants]}")
    named = [(v.name, bench.apply_overrides(_CONFIG.value, v.overrides)) for v in variants]
    env = environment()
    header = (f"# bench {config_flags.get_config_filename(flags.FLAGS['config'])}  ({env['backend']} "
              f"{env['device_kind']} x{env['devices']}, jax {env['jax']}, {env['date']}, "
              f"load {env.get('load_avg_1m', float('nan')):.2f})")
    print(header)
    for v in variants:
        print(f"  {v.name}: {dict(v.overrides) or '(base config)'}")

    if _SAMPLER.value:
        rows = bench.time_samplers(named, batch=_SAMPLER_BATCH.value, prompt_len=_PROMPT_LEN.value,
                                   guidance=not _NO_CFG.value, warmup=max(_WARMUP.value - 1, 0), rounds=_STEPS.value)
        table = bench.sampler_table(rows)
    else:
        runners = []
        for name, cfg in named:
            r = bench.make_runner(cfg, name=name, real_data=_REAL.value)
            print(f"  built {name}: {r.built.n_params:,} params, compiled in {r.compile_s:.1f}s", flush=True)
            runners.append(r)
        bench.time_interleaved(runners, warmup=_WARMUP.value, rounds=_STEPS.value,
                               steps_per_round=_PER_ROUND.value)
        rows = bench.summarize(runners, peak_tflops=_PEAK.value)
        table = bench.bench_table(rows)
        for r in rows:
            if r.skipped_steps:
                print(f"WARNING: {r.variant}: {r.skipped_steps} timed steps were non-finite and skipped the update; "
                      f"its time is not representative", file=sys.stderr)
        peak = rows[0].peak_tflops if rows else 0.0
        note = (f"MFU peak {peak:.4g} TFLOP/s per device; median of {_STEPS.value} interleaved rounds x "
                f"{_PER_ROUND.value} step(s) after {_WARMUP.value} warm-up; "
                + ("real data batches" if _REAL.value else "the stage's dummy batch"))
        header += "\n" + note
        print(note)
    print(table)
    if _OUT.value:
        write_out(_OUT.value, {"env": env, "variants": [{"name": v.name, "overrides": dict(v.overrides)}
                                                       for v in variants],
                               "mode": "sampler" if _SAMPLER.value else "train_step",
                               "rows": [r.as_dict() for r in rows]}, table, header)
        print(f"wrote {_OUT.value}.json / .md")


def run_suite(small: bool) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import scale_bench

    env = environment()
    header = (f"# bench --suite={'scale_small' if small else 'scale'}  ({env['backend']} {env['device_kind']} "
              f"x{env['devices']}, {env.get('cpu_model', '?')} {env.get('cpu_isa', '')}, jax {env['jax']}, {env['date']}, "
              f"load {env.get('load_avg_1m', float('nan')):.2f}; "
              f"medians of {_STEPS.value} interleaved rounds after {_WARMUP.value} warm-up)")
    print(header, flush=True)
    cache = _OUT.value + "_before" if _OUT.value else ""  # the old checkout's timings, reused on a re-run
    payload, text = scale_bench.run(small=small, steps=_STEPS.value, warmup=_WARMUP.value, before_src=_BEFORE.value,
                                    cache_dir=cache, emit=lambda t: print(t, flush=True),
                                    step_variants=_SUITE_STEPS.value)
    if _OUT.value:
        write_out(_OUT.value, {"env": env, "mode": "suite", **payload}, text, header)
        print(f"wrote {_OUT.value}.json / .md")


if __name__ == "__main__":
    app.run(main)
