"""Peak FLOP/s per device and model-FLOPs utilisation (MFU).

MFU = achieved model FLOP/s (analytic FLOPs per example x examples/s, from the stage) / peak. Peaks are
vendor bf16 dense numbers per platform; on CPU there is no such number, so a large matmul is timed
once per process (see `measured_cpu_peak_tflops`).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

# Dense bf16 TFLOP/s per chip/GPU (vendor data sheets).
_PEAKS = (
    ("v6", 918.0),  # Trillium / v6e ("TPU v6 lite")
    ("v5p", 459.0),
    ("v5 lite", 197.0), ("v5e", 197.0),
    ("v4", 275.0),
    ("h200", 989.0), ("h100", 989.0),
    ("a100", 312.0),
)
_CPU_CACHE: dict[str, float] = {}


def measured_cpu_peak_tflops(n: int = 2048, reps: int = 5) -> float:
    """Whole-machine float32 matmul TFLOP/s, measured once per process (best of `reps`).

    Not cached on disk: a value measured while the machine was busy would mislead every later run.
    """
    key = f"{os.cpu_count()}:{n}"
    if key in _CPU_CACHE:
        return _CPU_CACHE[key]
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    _CPU_CACHE[key] = 2.0 * n ** 3 / best / 1e12
    return _CPU_CACHE[key]


def peak_tflops_per_device(configured: float = 0.0, device: jax.Device | None = None) -> float:
    """`configured` if > 0, else the platform default for `device` (default: first device).

    CPU devices simulated with --xla_force_host_platform_device_count share the machine, so the
    measured machine peak is divided among the local devices.
    """
    if configured > 0:
        return float(configured)
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "").lower()
    for name, peak in _PEAKS:
        if name in kind:
            return peak
    if device.platform == "cpu":
        return measured_cpu_peak_tflops() / max(jax.local_device_count(), 1)
    return 0.0  # unknown accelerator: MFU is not reported


def throughput(*, steps: int, seconds: float, global_batch: int, flops_per_example: float,
               tokens_per_example: float, num_devices: int, peak_tflops: float) -> dict[str, float]:
    """examples/s, tokens/s, TFLOP/s per device and MFU for `steps` steps taking `seconds`."""
    if seconds <= 0 or steps <= 0:
        return {}
    ex_s = steps * global_batch / seconds
    out = {"examples_per_sec": ex_s, "steps_per_sec": steps / seconds}
    if tokens_per_example > 0:
        out["tokens_per_sec"] = ex_s * tokens_per_example
    if flops_per_example > 0:
        tf = ex_s * flops_per_example / num_devices / 1e12
        out["tflops_per_device"] = tf
        if peak_tflops > 0:
            out["mfu"] = tf / peak_tflops
    return out
