"""Will it fit? AOT-compile the train step of real-scale configs on simulated CPU devices.

    python tools/dry_run.py --config=configs/umm_1b.py --config=configs/umm_7b.py \
        --devices=8 --target_devices=32 [--batch_per_device=N] [--set=train.remat=False] [--out=runs/dry/umm]

MaxText's train_compile idea without a TPU: `--devices` CPU devices are simulated
(`--xla_force_host_platform_device_count`, set before jax is imported), the mesh comes from the
config, the train state is only `jax.eval_shape`d (no parameter is allocated, so 1B / 7B configs
run on a laptop), and the step is lowered and compiled on ShapeDtypeStructs carrying the
shardings the loop would use. Printed per config: parameter counts, the sharding of the largest
parameters, XLA's per-device memory analysis (argument / output / temp bytes) and whether the
estimated peak fits `--hbm_gib` (default 95: a TPU v5p chip).

Batch: the real run has `train.batch_size` rows over `--target_devices` chips; the simulated run
keeps the rows per data-parallel shard equal (`--batch_per_device` overrides), so activation and
temporary memory per device match the target, and the sharded train state is recomputed for the
target mesh. Caveat: XLA:CPU fuses and schedules differently from XLA:TPU (and has no native
bf16 matmul), so its temp bytes are an estimate, not the TPU number. Its default
concurrency-optimised scheduler keeps so much live that remat changes nothing (measured: 42 GB temp
with and without remat on a 2-layer slice of umm_1b), so `--memory_scheduler` (default on) asks for
the memory-minimising one.
"""
from __future__ import annotations

import copy
import json
import os
import sys

from absl import app, flags

_CONFIGS = flags.DEFINE_multi_string("config", [], "Config file(s) path[:arg]; repeatable.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated CPU devices to compile for.")
_TARGET = flags.DEFINE_integer("target_devices", 0, "Chips of the real run (0 = --devices).")
_PER_DEVICE = flags.DEFINE_integer("batch_per_device", 0,
                                   "Rows per data-parallel shard (0 = train.batch_size / target data x fsdp).")
_SET = flags.DEFINE_multi_string("set", [], "Overrides 'field=value,field=value' applied to every config.")
_HBM = flags.DEFINE_float("hbm_gib", 95.0, "Device memory to fit in, GiB (TPU v5p: 95).")
_OUT = flags.DEFINE_string("out", "", "Also write OUT.json and OUT.md.")
_MEMORY_SCHEDULER = flags.DEFINE_bool(
    "memory_scheduler", True,
    "Schedule for memory, not concurrency (--xla_cpu_enable_concurrency_optimized_scheduler=false). XLA:CPU's "
    "default scheduler keeps far more live (it made remat a no-op: 42 GB temp with or without remat on a "
    "2-layer 1B slice); the memory-minimising one is closer to what XLA:TPU's scheduler aims for.")


def scaled_batch(cfg, devices: int, target: int, per_device: int) -> tuple[int, int]:
    """-> (simulated global batch, rows per data-parallel shard) keeping the rows per shard of the
    target run (`train.batch_size` over the target mesh's data x fsdp)."""
    from sgt_jax.config import resolve_mesh_shape

    sim = resolve_mesh_shape(cfg.mesh.shape, devices)
    tgt = resolve_mesh_shape(cfg.mesh.shape, target)
    if per_device <= 0:
        dp = tgt[0] * tgt[1]
        if int(cfg.train.batch_size) % dp:
            raise app.UsageError(f"train.batch_size {cfg.train.batch_size} does not split over the target's "
                                 f"data x fsdp = {dp}; pass --batch_per_device")
        per_device = int(cfg.train.batch_size) // dp
    return per_device * sim[0] * sim[1], per_device


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CONFIGS.value:
        raise app.UsageError("pass at least one --config=path[:arg]")
    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before the simulated device count could be set")
    ours = ("--xla_force_host_platform_device_count", "--xla_cpu_enable_concurrency_optimized_scheduler")
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(ours)]
    kept.append(f"--xla_force_host_platform_device_count={_DEVICES.value}")
    if _MEMORY_SCHEDULER.value:
        kept.append("--xla_cpu_enable_concurrency_optimized_scheduler=false")
    os.environ["XLA_FLAGS"] = " ".join(kept)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import bench_lib as bench  # tools/bench_lib.py: imports jax, so after the device flags
    import jax

    from sgt_jax.config import finalize, load_config, parse_assignments

    if jax.device_count() != _DEVICES.value:
        raise RuntimeError(f"asked for {_DEVICES.value} simulated devices, jax sees {jax.device_count()}")
    target = _TARGET.value or _DEVICES.value
    overrides = []
    for s in _SET.value:
        overrides += list(parse_assignments(s).items())
    reports, texts = [], []
    for spec in _CONFIGS.value:
        cfg = bench.apply_overrides(load_config(spec), overrides)
        global_batch, per = scaled_batch(finalize(copy.deepcopy(cfg)), _DEVICES.value, target, _PER_DEVICE.value)
        target_batch = int(cfg.train.batch_size)
        cfg = bench.apply_overrides(cfg, [("train.batch_size", global_batch)])
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
        print(f"compiling {spec}: target batch {target_batch} on {target} chips -> {per} rows per shard -> "
              f"simulated global batch {global_batch} on {_DEVICES.value} devices ...", flush=True)
        rep = bench.dry_run(cfg, name=spec, target_devices=target, hbm_gib=_HBM.value)
        text = bench.dry_run_text(rep)
        print(text, flush=True)
        reports.append(rep)
        texts.append(text)
    summary = bench.markdown_table(
        ("config", "params", "sim devices", "rows/shard", "peak GiB/dev (sim)", "target chips",
         "state GiB/dev (target)", "est. peak GiB/dev (target)", f"fits {_HBM.value:g} GiB"),
        [(r.config, f"{r.params / 1e9:.3f}B", r.devices, f"{r.per_device_batch:g}",
          f"{r.memory.get('peak', 0) / bench.GiB:.2f}", r.target_devices, f"{r.target_state_bytes / bench.GiB:.2f}",
          f"{r.target_peak_bytes / bench.GiB:.2f}", "yes" if r.fits else "NO") for r in reports])
    print(summary)
    if _OUT.value:
        prefix = os.path.splitext(_OUT.value)[0] if _OUT.value.endswith((".json", ".md")) else _OUT.value
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        with open(prefix + ".json", "w") as f:
            json.dump([r.as_dict() for r in reports], f, indent=2, default=str)
        with open(prefix + ".md", "w") as f:
            f.write("\n\n".join(texts) + "\n\n" + summary + "\n")
        print(f"wrote {prefix}.json / .md")
    return 0 if all(r.fits for r in reports) else 1


if __name__ == "__main__":
    app.run(main)
