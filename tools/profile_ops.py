"""Where the time of the speed suite's LM train step and CFG sampler goes, op by op.

    python tools/profile_ops.py [--what=lm,sampler,torch,gemm] [--calls=2] [--small]

- `lm`: sgt_jax's AdamW f32 step of the Qwen2-shaped LM of `tools/scale_bench.py` (same shape,
  batch and loss), profiled with XLA:CPU's per-thunk trace (`--xla_cpu_enable_xprof_traceme`) and
  read back with `jax.profiler.ProfileData`; ops are grouped by kind (`ynn_fusion` = library dots,
  `wrapped_broadcast` = zero-filled buffers, `dynamic-slice...` = slices of stacked layers, ...).
- `sampler`: `generate_codes` on the suite's sampler shape, the same way.
- `torch`: HF transformers + torch's step on the same LM, with `torch.profiler` (self CPU time per
  aten op; the profiler itself slows the step, so compare shares, not seconds).
- `gemm`: f32 GFLOP/s of the LM step's four matmul shapes alone, jax vs torch, interleaved (is a
  gap in the step the kernels' or the rest's?).

Times are per call, summed over the threads that ran the ops (so they can exceed the wall time on
2 cores). This explains the suite's ratios; it does not replace them (profiling perturbs timing).
"""
from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

_KINDS = ("lm", "sampler", "torch", "gemm")
_WHAT = flags.DEFINE_list("what", list(_KINDS), "Which profiles: lm, sampler, torch, gemm.")
_CALLS = flags.DEFINE_integer("calls", 2, "Profiled calls (after warm-up calls); times are per call.")
_SMALL = flags.DEFINE_bool("small", False, "The suite's small shapes (a quick check that it runs).")
_TOP = flags.DEFINE_integer("top", 15, "Op kinds to list.")


# Spans that contain ops rather than being one (executor, jit dispatch, loop and call bodies).
_NOT_OPS = ("ThunkExecutor", "PjitFunction", "end:", "$", "while", "conditional", "call", "Handle", "ParseArguments",
            "CommonPjRtClient", "Allocate", "SlinkyThreadPool")


def op_kind(name: str) -> str:
    """'ynn_fusion.31' -> 'ynn_fusion': one row per kind of XLA op."""
    return re.sub(r"[.\d]+$", "", name)


def xla_op_times(trace_dir: str, calls: int) -> collections.Counter:
    """ms per call of each XLA op kind in a jax.profiler trace (executor spans left out)."""
    import jax

    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    out: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's own threads only (not Python's trace events)
                continue
            for ev in line.events:
                kind = op_kind(ev.name)
                if kind and not kind.startswith(_NOT_OPS):
                    out[kind] += ev.duration_ns / 1e6 / calls
    return out


def profile_jax(call, calls: int) -> collections.Counter:
    import jax

    call()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(calls):
            call()
        jax.profiler.stop_trace()
        return xla_op_times(d, calls)


def _lm(small: bool):
    """(shape, tokens) of the suite's LM comparison (tools/scale_bench.py)."""
    import scale_bench as sb

    shape, (b, s) = (sb.SMALL, (4, 32)) if small else (sb.LMShape(), (32, 160))
    return shape, sb.lm_tokens(shape, b, s)


def lm_call(small: bool):
    """-> call() running one sgt_jax LM step of the suite's shape (scale_bench.jax_lm_runner)."""
    import scale_bench as sb

    from sgt_jax.convert.hf_qwen2 import llm_config_from_hf

    shape, tokens = _lm(small)
    call, _, _ = sb.jax_lm_runner(llm_config_from_hf(shape.hf_config().to_dict()), tokens, warmup=0)
    return call


def sampler_call(small: bool):
    """-> call() sampling the suite's CFG batch (the sgt_jax side of scale_bench.sampler_vs_hf)."""
    import bench_lib as bench
    import scale_bench as sb

    shape = sb.SMALL if small else sb.LMShape()
    images, prompt, codes = (2, 16, 16) if small else (16, 96, 64)
    cfg = sb.sampler_config(shape, prompt_len=prompt, num_codes=codes)
    call, _, _ = bench.sampler_runner(cfg, batch=images, prompt_len=prompt, guidance=True)
    return call


def profile_torch(small: bool, calls: int) -> collections.Counter:
    """ms per call of each aten op's self CPU time in HF Qwen2's AdamW step (torch.profiler)."""
    import scale_bench as sb
    from torch.profiler import ProfilerActivity, profile

    step = sb.torch_lm_step(*_lm(small))
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    return collections.Counter({e.key: e.self_cpu_time_total / 1e3 / calls for e in prof.key_averages()})


def _matmul_seconds(a, b, transpose_a: bool, rounds: int) -> tuple[float, float]:
    """Median seconds of `a @ b` (or `a.T @ b`) in jax and in torch, interleaved round by round."""
    import statistics
    import time

    import jax
    import torch

    jf = jax.jit(lambda x, y: (x.T if transpose_a else x) @ y)
    ja, jb, ta, tb = jax.numpy.asarray(a), jax.numpy.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    calls = (lambda: jf(ja, jb).block_until_ready(), lambda: (ta.T if transpose_a else ta) @ tb)
    times: tuple[list, list] = ([], [])
    for _ in range(rounds):
        for fn, ts in zip(calls, times, strict=True):
            fn()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            ts.append((time.perf_counter() - t0) / 5)
    return statistics.median(times[0]), statistics.median(times[1])


def gemm_rates(small: bool, rounds: int = 5) -> list[tuple[str, float, float]]:
    """(shape, jax GFLOP/s, torch GFLOP/s) of the LM step's matmuls, f32, medians of `rounds`."""
    import numpy as np
    import scale_bench as sb

    shape, tokens = (sb.SMALL, 128) if small else (sb.LMShape(), 32 * 160)
    w, f, v = shape.width, shape.mlp, shape.vocab
    rng = np.random.default_rng(0)
    cases = [(f"x W  [{tokens},{w}]x[{w},{f}]", (tokens, w), (w, f), False),
             (f"dy W^T  [{tokens},{f}]x[{f},{w}]", (tokens, f), (f, w), False),
             (f"x^T dy  [{w},{tokens}]x[{tokens},{f}]", (tokens, w), (tokens, f), True),
             (f"LM head  [{tokens},{w}]x[{w},{v}]", (tokens, w), (w, v), False)]
    out = []
    for name, sa, sb_, transpose_a in cases:
        a, b = rng.random(sa, np.float32), rng.random(sb_, np.float32)
        flops = 2 * a.size * b.shape[1]  # 2 M K N, with or without the transpose
        jax_s, torch_s = _matmul_seconds(a, b, transpose_a, rounds)
        out.append((name, flops / jax_s / 1e9, flops / torch_s / 1e9))
    return out


def table(title: str, times: collections.Counter, top: int) -> str:
    total = sum(times.values())
    rows = [f"## {title}: {total:.1f} ms of op time per call", "| op kind | ms per call | share |", "|---|---|---|"]
    rows += [f"| {k} | {v:.1f} | {100 * v / total:.1f}% |" for k, v in times.most_common(top)]
    return "\n".join(rows)


def main(argv):
    del argv
    unknown = sorted(set(_WHAT.value) - set(_KINDS))
    if unknown:
        raise app.UsageError(f"--what={unknown} is not known; allowed: {', '.join(_KINDS)}")
    import provenance

    cpu = provenance.host_cpu()
    print(f"# profile_ops at {provenance.git_commit()} on {cpu.get('cpu_model', 'an unknown CPU')} "
          f"({cpu.get('cpu_isa', 'ISA unknown')}), "
          f"{os.cpu_count()} CPUs, {_CALLS.value} profiled call(s)\n")
    if "lm" in _WHAT.value:
        print(table("sgt_jax LM step (XLA ops)", profile_jax(lm_call(_SMALL.value), _CALLS.value), _TOP.value) + "\n")
    if "sampler" in _WHAT.value:
        print(table("sgt_jax CFG sampler call (XLA ops)", profile_jax(sampler_call(_SMALL.value), _CALLS.value),
                    _TOP.value) + "\n")
    if "torch" in _WHAT.value:
        print(table("HF + torch LM step (aten self CPU, under the profiler)", profile_torch(_SMALL.value, _CALLS.value),
                    _TOP.value) + "\n")
    if "gemm" in _WHAT.value:
        rows = gemm_rates(_SMALL.value)
        print("## f32 matmuls of the LM step alone (GFLOP/s, median of 5 interleaved rounds of 5 calls)\n"
              "| shape | jax | torch | jax / torch |\n|---|---|---|---|")
        print("\n".join(f"| {n} | {j:.0f} | {t:.0f} | {j / t:.2f} |" for n, j, t in rows) + "\n")


if __name__ == "__main__":
    app.run(main)
