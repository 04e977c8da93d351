"""Benchmark and dry-run tooling: variant parsing, interleaved timing of the real jitted step, the
table's derived numbers, and AOT memory analysis on abstract inputs. No timing assertions: speed is
measured by tools/bench.py, not asserted here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_toy_stage import ToyStage, toy_config

from sgt_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_lib as bench  # noqa: E402  (tools/bench_lib.py: the library behind tools/bench.py and dry_run.py)
from xla_env import xla_flags  # noqa: E402


def test_variant_parsing_and_overrides():
    v = bench.parse_variant("bf16:train.compute_dtype=bfloat16,mesh.shape=(1, -1, 1),train.remat=True,optim.lr=1")
    assert v.name == "bf16"
    assert dict(v.overrides) == {"train.compute_dtype": "bfloat16", "mesh.shape": (1, -1, 1),
                                 "train.remat": True, "optim.lr": 1}
    assert bench.parse_variant("base") == bench.Variant("base", ())
    with pytest.raises(ValueError):
        bench.parse_variant(":train.remat=True")
    with pytest.raises(ConfigError, match="not field=value"):
        bench.parse_variant("x:train.remat")

    cfg = toy_config()
    out = bench.apply_overrides(cfg, v.overrides)
    assert out.train.compute_dtype == "bfloat16" and out.train.remat is True
    assert tuple(out.mesh.shape) == (1, -1, 1) and isinstance(out.optim.lr, float) and out.optim.lr == 1.0
    assert cfg.train.compute_dtype == "float32" and cfg.train.remat is False  # the base is not touched
    for bad in ("train.nope", "nope.remat", "train.remat.x"):
        with pytest.raises(ConfigError, match="unknown config field"):
            bench.apply_overrides(cfg, [(bad, 1)])


def test_interleaved_bench_of_two_variants():
    cfg = toy_config()
    named = [("f32", cfg), ("bf16", bench.apply_overrides(cfg, [("train.compute_dtype", "bfloat16")]))]
    runners = [bench.make_runner(c, name=n, stage=ToyStage(c)) for n, c in named]
    bench.time_interleaved(runners, warmup=1, rounds=4, steps_per_round=2)
    # Round-robin: A_i < B_i < A_{i+1}.
    a, b = runners[0].starts, runners[1].starts
    assert len(a) == len(b) == 4
    assert all(a[i] < b[i] < a[i + 1] for i in range(3)) and a[3] < b[3]
    # The state really trained: warm-up + rounds x steps updates, none skipped.
    for r in runners:
        assert int(jax.device_get(r.state.step)) == 1 + 4 * 2
        assert r.skipped == 0 and np.isfinite(r.last_loss)

    # The table's numbers from known round times (not the implementation's own formulas): toy
    # batch 16, 8 devices, 6 x (8*8 + 8*32 + 32*4) = 2688 FLOPs and 1 token per example, peak 2 TFLOP/s.
    runners[0].times, runners[1].times = [0.5, 0.25, 1.0, 0.25], [0.5, 0.5, 0.5, 1.0]
    rows = bench.summarize(runners, peak_tflops=2.0)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(runners[0].built.setup.abstract.params))
    assert jax.device_count() == 8 and runners[0].built.stage.flops_per_example() == 2688.0
    for row in rows:
        assert row.params == n_params and 0 < row.trainable < row.params  # frozen_in is frozen
        assert row.n == 4 and row.global_batch == 16 and row.devices == 8
        assert row.compile_s > 0 and row.peak_mem_gib > 0
    r0, r1 = rows
    assert (r0.step_s_median, r0.step_s_min, r0.step_s_max) == (0.375, 0.25, 1.0)
    assert r0.examples_per_sec == pytest.approx(42.6667, rel=1e-4) and r0.tokens_per_sec == pytest.approx(42.6667,
                                                                                                       rel=1e-4)
    assert r0.tflops_per_device == pytest.approx(1.4336e-8, rel=1e-4)  # 42.667 ex/s x 2688 / 8 devices
    assert r0.mfu == pytest.approx(7.168e-9, rel=1e-4) and r0.peak_tflops == 2.0
    assert r0.ratio == 1.0 and r1.ratio == pytest.approx(4 / 3) and r1.examples_per_sec == 32.0
    table = bench.bench_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| f32 |") and lines[3].startswith("| bf16 |")
    assert all(line.count("|") == len(bench.BENCH_COLUMNS) + 1 for line in lines)
    json.dumps([r.as_dict() for r in rows])


def test_dry_run_abstract_compile_reports_memory():
    cfg = toy_config()
    cfg.mesh.shape = (2, -1, 2)  # (2, 2, 2) here, (2, 8, 2) on the 32-chip target
    rep = bench.dry_run(cfg, name="toy", target_devices=32, stage=ToyStage(cfg))
    m = rep.memory
    assert rep.devices == 8 and rep.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
    assert rep.target_mesh == {"data": 2, "fsdp": 8, "tensor": 2} and rep.per_device_batch == 4
    # Analytic per-device state: params + Adam moments (fp32, each leaf's shard); the donated state
    # and the batch are arguments, so XLA's argument bytes cover the state.
    assert 0 < rep.state_bytes <= m["argument"]
    assert m["temp"] > 0 and m["alias"] > 0 and m["peak"] >= m["argument"]
    full = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(
        bench.build(cfg, materialize=False, stage=ToyStage(cfg)).setup.abstract))
    assert rep.state_bytes * 4 >= full > rep.state_bytes  # sharded (fsdp x tensor), shards cover the state
    assert rep.target_state_bytes <= rep.state_bytes  # more chips, smaller shards
    assert rep.target_peak_bytes == m["peak"] - rep.state_bytes + rep.target_state_bytes
    assert rep.fits and rep.params == 8 * 8 + 8 + 8 * 32 + 32 + 2 * 32 + 32 * 4 + 4
    assert rep.big_params[0] == ("hidden/kernel", (8, 32), "P('fsdp', 'tensor')")
    assert "FITS" in bench.dry_run_text(rep)


def _run_tool(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_dry_run_tool_on_umm_smoke(tmp_path):
    out = tmp_path / "dry"
    stdout = _run_tool(["tools/dry_run.py", "--config=configs/umm_1b.py:smoke", "--devices=4",
                        "--target_devices=16", "--batch_per_device=2", f"--out={out}"])
    assert "FITS" in stdout and "umm/llm/embedder/embedding" in stdout
    (rep,) = json.loads((tmp_path / "dry.json").read_text())
    # 2 rows per FSDP shard on 4 simulated devices -> a global batch of 8.
    assert rep["devices"] == 4 and rep["target_devices"] == 16 and rep["global_batch"] == 8
    assert rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert rep["target_state_bytes"] < rep["state_bytes"]
    assert rep["memory"]["argument"] > 0 and rep["memory"]["temp"] > 0
    assert rep["params"] > rep["trainable"] > 0


def test_bench_tool_on_smoke_config(tmp_path):
    out = tmp_path / "bench"
    # The VQ stage (the UMM one is compiled by the dry-run test); one variant keeps this to one
    # compile, test_interleaved_bench_of_two_variants covers several.
    stdout = _run_tool(["tools/bench.py", "--config=configs/vq_shapes.py:smoke", "--config.train.batch_size=4",
                        "--variant=small:optim.lr=3e-4", "--steps=2", "--warmup=1", "--devices=2", f"--out={out}"])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["variants"] == [{"name": "small", "overrides": {"optim.lr": 3e-4}}]
    (r,) = data["rows"]
    assert r["variant"] == "small" and data["env"]["devices"] == 2 and r["global_batch"] == 4
    assert r["n"] == 2 and r["step_s_median"] > 0 and r["examples_per_sec"] > 0 and r["params"] > 0
    assert r["tflops_per_device"] > 0 and r["skipped_steps"] == 0 and np.isfinite(r["loss"])
    assert "| small |" in stdout
    assert (tmp_path / "bench.md").read_text().count("\n|") >= 3


def test_dry_run_names_indivisible_parameters():
    cfg = toy_config()
    cfg.mesh.shape = (1, -1, 1)  # out/kernel (32, 4) has 'embed' -> fsdp = 8 on its dim of 4
    with pytest.raises(ValueError, match=r"out/kernel \(32, 4\)"):
        bench.dry_run(cfg, name="toy", stage=ToyStage(cfg))


def test_scale_suite_loads_its_configs_and_reuses_the_old_checkouts_timings(tmp_path, monkeypatch):
    """The suite's config specs load (a renamed loader crashed a 50-minute run at this point), and
    a cached timing of the old checkout is reused instead of timing it again; a cache made with other
    steps is not."""
    import json
    import subprocess

    import scale_bench

    specs, (full_spec, full_over) = scale_bench.scale_specs(small=False)
    for _, spec, over in [*specs, ("full", full_spec, full_over)]:
        cfg = scale_bench._load(spec, over)
        assert int(cfg.train.batch_size) > 0
    assert int(scale_bench._load(*specs[1][1:]).model.umm.llm.depth) == 2
    row = {"variant": "base_shapes", "step_s_median": 8.4, "n": 3}
    (tmp_path / "base_shapes.json").write_text(json.dumps({"env": {"date": "d"}, "rows": [row], "warmup": 1}))
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    got = scale_bench.before_step_seconds("/old", specs[:1], steps=3, warmup=1, cache_dir=str(tmp_path))
    assert got["base_shapes"]["step_s_median"] == 8.4 and got["base_shapes"]["reused"] and not calls
    with pytest.raises(FileNotFoundError):  # steps differ: the old checkout is timed again (faked here)
        scale_bench.before_step_seconds("/old", specs[:1], steps=5, warmup=1, cache_dir=str(tmp_path))
    assert len(calls) == 1 and "--steps=5" in calls[0]


def test_scale_suite_interleaves_with_a_rewarm_and_checks_its_variants():
    """Each timed call follows an untimed call of the same function (the first call after the other
    framework ran is slow), alternating frameworks; an unknown train-step variant fails before
    anything is measured."""
    import scale_bench

    log = []
    a, b = scale_bench._interleaved(lambda: log.append("a"), lambda: log.append("b"), rounds=2)
    assert log == ["a", "a", "b", "b", "a", "a", "b", "b"] and len(a) == len(b) == 2
    with pytest.raises(ValueError, match="umm_7b.*allowed"):
        scale_bench.run(small=True, step_variants=["umm_7b"], emit=lambda t: pytest.fail("measured: " + t))


def test_profile_ops_tool_groups_xla_and_torch_ops():
    """tools/profile_ops.py --small: per-op-kind tables of the LM step, the sampler and torch's step;
    the library dots and aten::mm show up, and the XLA kinds have their numeric suffixes stripped."""
    stdout = _run_tool(["tools/profile_ops.py", "--small", "--calls=1", "--top=40", "--what=lm,sampler,torch"])
    sections = stdout.split("## ")[1:]
    assert [s.split(":")[0] for s in sections] == ["sgt_jax LM step (XLA ops)", "sgt_jax CFG sampler call (XLA ops)",
                                                   "HF + torch LM step (aten self CPU, under the profiler)"]
    kinds = [[row.split(" | ")[0].lstrip("| ") for row in s.splitlines()[3:] if row.startswith("|")] for s in sections]
    assert kinds[0] and kinds[1] and all(not k[-1].isdigit() for k in kinds[0] + kinds[1])
    assert any("fusion" in k or k == "dot" for k in kinds[0]) and "aten::mm" in kinds[2]
