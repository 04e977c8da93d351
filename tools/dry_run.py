"""Will it fit? AOT-compile the train step of real-scale configs for a TPU slice, or estimate on CPU.

    # The TPU compiler (libtpu, no chip needed): what the pod would run, per chip.
    python tools/dry_run.py --config=configs/umm_1b.py --topology=v5p:4x4x4 [--batch_per_device=N] \
        [--set=train.remat=False] [--out=runs/dry/umm_1b_v5p64]
    # Estimate on simulated CPU devices (no libtpu):
    python tools/dry_run.py --config=configs/umm_1b.py --config=configs/umm_7b.py \
        --devices=8 --target_devices=32 [--batch_per_device=N] [--set=train.remat=False] [--out=runs/dry/umm]

With `--topology=GEN:AxBxC` (v5p, v5e, v6e names, e.g. v5p:4x4x4 = v5p-64, v5p:4x4x8 = v5p-128,
v5p:4x8x8 = v5p-256, v5e:16x16 = v5e-256), libtpu's compile-only devices of that slice make the mesh
(sgt_jax/train/aot.py), and the real train step, jit shardings included, is compiled by the TPU
compiler: printed per chip are argument / output / temp / generated-code bytes, the peak against the
chip's HBM, FLOPs per step from the executable's cost analysis beside the analytic count
(train/flops.py via the stage), and the compile time. `--batch_per_device` sets rows per
data-parallel shard (global batch = that x data x fsdp); default: the config's train.batch_size.

Without `--topology`, MaxText's train_compile idea without libtpu (an ESTIMATE): `--devices` CPU devices are simulated
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

import provenance  # tools/provenance.py
from absl import app, flags

_CONFIGS = flags.DEFINE_multi_string("config", [], "Config file(s) path[:arg]; repeatable.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated CPU devices to compile for.")
_TARGET = flags.DEFINE_integer("target_devices", 0, "Chips of the real run (0 = --devices).")
_PER_DEVICE = flags.DEFINE_integer("batch_per_device", 0,
                                   "Rows per data-parallel shard (0 = train.batch_size / target data x fsdp).")
_SET = flags.DEFINE_multi_string("set", [], "Overrides 'field=value,field=value' applied to every config.")
_HBM = flags.DEFINE_float("hbm_gib", 95.0, "Device memory to fit in, GiB (TPU v5p: 95).")
_OUT = flags.DEFINE_string("out", "", "Also write OUT.json and OUT.md.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice to compile for with libtpu, e.g. v5p:4x4x4, v5e:16x16 "
                                "(empty: simulated-CPU estimate). --hbm_gib defaults to the chip's HBM.")
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


def _config_notes(cfg) -> str:
    """The fields that decide memory besides the batch: remat and attention settings, whatever their names."""
    out = []

    def walk(node, prefix):
        for k in sorted(node.keys()):
            v = node[k]
            name = f"{prefix}{k}"
            if hasattr(v, "keys"):
                walk(v, name + ".")
            elif any(t in k for t in ("remat", "attention", "attn_impl", "scan")):
                out.append(f"{name}={v}")
    walk(cfg, "")
    return ", ".join(out)


def topology_main(specs, overrides) -> int:
    """Compile each config for --topology with the TPU compiler; print and write the per-chip numbers."""
    import platform
    import time

    import bench_lib as bench  # tools/bench_lib.py: imports jax, so after JAX_PLATFORMS is set
    import jax

    from sgt_jax.config import load_config, resolve_mesh_shape
    from sgt_jax.train import aot

    try:
        devices = aot.topology_devices(_TOPOLOGY.value)
    except ValueError as e:
        raise app.UsageError(str(e), exitcode=2) from None
    n = len(devices)
    hbm = int(_HBM.value * aot.GiB) if _HBM.present else aot.hbm_bytes(_TOPOLOGY.value)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    reports, texts = [], []
    for spec in specs:
        cfg = bench.apply_overrides(load_config(spec), overrides)
        mesh = resolve_mesh_shape(cfg.mesh.shape, n)
        dp = mesh[0] * mesh[1]
        if _PER_DEVICE.value > 0:
            cfg = bench.apply_overrides(cfg, [("train.batch_size", _PER_DEVICE.value * dp)])
        print(f"compiling {spec} for {_TOPOLOGY.value} ({n} chips, {devices[0].device_kind}), mesh {mesh}, "
              f"global batch {cfg.train.batch_size} ...", flush=True)
        t0 = time.perf_counter()
        built = bench.build(cfg, name=spec, materialize=False, devices=devices)
        build_s = time.perf_counter() - t0
        _, st = aot.compile_step(built.jstep, built.abstract_inputs(), built.context())
        applied = jax.tree.leaves(st.input_shardings[0][0])
        wanted = jax.tree.leaves(built.setup.shardings)
        shardings_ok = len(applied) == len(wanted) and all(
            a.is_equivalent_to(w, len(leaf.shape)) for a, w, leaf in
            zip(applied, wanted, jax.tree.leaves(built.setup.abstract), strict=True))
        global_batch = int(cfg.train.batch_size)
        analytic = float(built.stage.flops_per_example()) * global_batch / n
        m = st.memory
        rep = {
            "config": spec, "topology": _TOPOLOGY.value, "chips": n, "device_kind": devices[0].device_kind,
            "mesh": dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)), "global_batch": global_batch,
            "rows_per_shard": global_batch / dp, "params": built.n_params, "trainable": built.n_trainable,
            "compute_dtype": str(cfg.train.compute_dtype), "grad_accum_steps": int(cfg.optim.grad_accum_steps),
            "settings": _config_notes(cfg), "memory": m, "hbm_bytes": hbm,
            "headroom": 1.0 - m["peak"] / hbm, "fits": m["peak"] <= hbm,
            "flops_per_chip_compiled": st.flops_per_chip, "flops_per_chip_analytic": analytic,
            "state_shardings_applied": bool(shardings_ok), "build_s": build_s, "lower_s": st.lower_s,
            "compile_s": st.compile_s, "load_avg": list(load), "cpus": os.cpu_count(), "host": platform.node(),
            "commit": provenance.git_commit(), **provenance.host_cpu(),
            "big_params": bench.big_params(built),
        }
        g = lambda b: f"{b / aot.GiB:.2f}"  # noqa: E731
        text = "\n".join([
            f"== {spec} on {_TOPOLOGY.value} ({n} x {rep['device_kind']}, TPU compiler): mesh {rep['mesh']}, "
            f"global batch {global_batch} ({rep['rows_per_shard']:g} rows/shard, accum {rep['grad_accum_steps']}), "
            f"{rep['compute_dtype']}; {rep['settings']}",
            f"params {built.n_params:,} ({built.n_trainable:,} trainable); state shardings applied as built: "
            f"{'yes' if shardings_ok else 'NO'}",
            "largest parameters:",
            *[f"  {p:60s} {str(s):18s} {sp}" for p, s, sp in rep["big_params"]],
            bench.markdown_table(
                ("per chip GiB", "argument", "output", "alias", "temp", "code", "peak", "HBM", "headroom"),
                [("TPU compiler", g(m["argument"]), g(m["output"]), g(m["alias"]), g(m["temp"]),
                  g(m["generated_code"]), g(m["peak"]), g(hbm), f"{100 * rep['headroom']:.1f}%")]),
            f"-> {'FITS' if rep['fits'] else 'DOES NOT FIT'} ({g(m['peak'])} of {g(hbm)} GiB per chip)",
            f"FLOPs per step per chip: compiled {st.flops_per_chip:.4g} (cost_analysis: includes remat recompute, but "
            f"counts a while loop's body once, so scanned layers count as one layer) vs analytic {analytic:.4g} "
            f"(stage.flops_per_example x batch / chips) = {st.flops_per_chip / analytic if analytic else float('nan'):.2f}x",
            f"time: build {build_s:.1f}s, lower {st.lower_s:.1f}s, compile {st.compile_s:.1f}s on {os.cpu_count()} CPUs, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start",
        ])
        print(text, flush=True)
        reports.append(rep)
        texts.append(text)
    summary = bench.markdown_table(
        ("config", "topology", "mesh", "global batch", "rows/shard", "settings", "peak GiB/chip", "HBM GiB",
         "headroom", "TFLOP/step/chip (compiled / analytic)", "compile s"),
        [(r["config"], r["topology"], tuple(r["mesh"].values()), r["global_batch"], f"{r['rows_per_shard']:g}",
          r["settings"], f"{r['memory']['peak'] / aot.GiB:.2f}", f"{r['hbm_bytes'] / aot.GiB:g}",
          f"{100 * r['headroom']:.1f}%",
          f"{r['flops_per_chip_compiled'] / 1e12:.1f} / {r['flops_per_chip_analytic'] / 1e12:.1f}",
          f"{r['compile_s']:.0f}") for r in reports])
    print(summary)
    _write(reports, texts, summary)
    return 0 if all(r["fits"] and r["state_shardings_applied"] for r in reports) else 1


def _write(reports, texts, summary) -> None:
    """OUT.json / OUT.md through epath, so gs:// works as for every other run output."""
    if not _OUT.value:
        return
    from etils import epath

    out = _OUT.value
    prefix = out[: -len(os.path.splitext(out)[1])] if out.endswith((".json", ".md")) else out
    epath.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(prefix + ".json").write_text(json.dumps(reports, indent=2, default=str))
    epath.Path(prefix + ".md").write_text("\n\n".join(texts) + "\n\n" + summary + "\n")
    print(f"wrote {prefix}.json / .md")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CONFIGS.value:
        raise app.UsageError("pass at least one --config=path[:arg]")
    if _TOPOLOGY.value:
        if "jax" in sys.modules:
            raise RuntimeError("jax was imported before JAX_PLATFORMS could be set")
        # Compile-only TPU devices: jax must not look for chips (or for GCP metadata off GCP).
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        # Compile-only use needs no exclusive chip lock (/tmp/libtpu_lockfile): let dry runs run side by side.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from sgt_jax.config import parse_assignments
        from sgt_jax.train import aot

        try:
            aot.parse_topology(_TOPOLOGY.value)
        except ValueError as e:
            raise app.UsageError(str(e), exitcode=2) from None

        overrides = []
        for s in _SET.value:
            overrides += list(parse_assignments(s).items())
        return topology_main(_CONFIGS.value, overrides)
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
        print(f"ESTIMATE (XLA:CPU, not the TPU compiler; pass --topology for that) compiling {spec}: target batch {target_batch} on {target} chips -> {per} rows per shard -> "
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
    _write([r.as_dict() for r in reports], texts, summary)
    return 0 if all(r.fits for r in reports) else 1


if __name__ == "__main__":
    app.run(main)
