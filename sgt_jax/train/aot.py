"""Ahead-of-time compile the train step for a TPU topology this machine does not have.

libtpu ships the real TPU compiler; `jax.experimental.topologies.get_topology_desc` gives
compile-only devices of a named slice (e.g. "v5p:4x4x4" = v5p-64), so a mesh of them, the jit
shardings and `jit(...).lower(...).compile()` produce the TPU executable's own memory and cost
analysis on a CPU-only host (MaxText's train_compile). The caller builds the step over
`topology_devices(...)` exactly as the loop builds it, and passes the step and its abstract inputs.
Run with `JAX_PLATFORMS=cpu` (and `TPU_SKIP_MDS_QUERY=1` off GCP) so jax does not look for chips.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from typing import Any, Sequence

import jax

GiB = 1024 ** 3

# HBM per chip, GiB (Cloud TPU docs: https://cloud.google.com/tpu/docs/v5p "HBM capacity per chip
# (GiB) 95"; https://cloud.google.com/tpu/docs/v5e 16 GiB; https://cloud.google.com/tpu/docs/v6e 32 GiB;
#  v4 is left out: its topology names count TensorCores, not chips).
HBM_GIB = {"v5p": 95.0, "v5e": 16.0, "v6e": 32.0}
_TOPOLOGY = re.compile(r"^(v5p|v5e|v6e):(\d+(?:x\d+){1,2})$")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """"v5p:4x4x4" -> ("v5p", (4, 4, 4)); a clear error for anything else."""
    m = _TOPOLOGY.match(name.strip())
    if not m:
        raise ValueError(f"--topology={name!r} is not GENERATION:AxB[xC] with GENERATION in {sorted(HBM_GIB)} "
                         "(e.g. v5p:4x4x4 = v5p-64, v5p:4x4x8 = v5p-128, v5e:16x16 = v5e-256, v6e:8x8)")
    return m.group(1), tuple(int(d) for d in m.group(2).split("x"))


def chips(name: str) -> int:
    n = 1
    for d in parse_topology(name)[1]:
        n *= d
    return n


def hbm_bytes(name: str) -> int:
    return int(HBM_GIB[parse_topology(name)[0]] * GiB)


def libtpu_missing_reason() -> str | None:
    """None when the TPU compiler can be loaded; otherwise why not (for skips and errors)."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        return f"libtpu is not installed ({e}); pip install -e '.[tpu]'"
    return None


def topology_devices(name: str) -> list[jax.Device]:
    """The compile-only TPU devices of slice `name` (no chip needed)."""
    parse_topology(name)
    reason = libtpu_missing_reason()
    if reason:
        raise RuntimeError(f"--topology={name}: {reason}")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    devices = list(desc.devices)
    if len(devices) != chips(name):
        raise RuntimeError(f"topology {name}: libtpu gave {len(devices)} devices, expected {chips(name)}")
    return devices


@dataclasses.dataclass
class CompiledStats:
    """Per-chip numbers from the TPU executable (XLA's memory and cost analysis)."""
    memory: dict[str, int]  # argument / output / alias / temp / generated_code / peak bytes
    flops_per_chip: float  # cost_analysis()["flops"]: the partitioned program, one chip
    bytes_accessed_per_chip: float
    lower_s: float
    compile_s: float
    input_shardings: Any  # what the executable actually takes (to check the jit shardings held)


def memory_stats(compiled) -> dict[str, int]:
    """peak = arguments + temporaries + outputs not aliased to (donated) arguments, + generated code
    (the executable lives in HBM too on TPU)."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("the compiled executable has no memory analysis")
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = out["argument"] + out["temp"] + max(out["output"] - out["alias"], 0) + out["generated_code"]
    return out


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence) and not isinstance(cost, dict):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_step(jstep, abstract_inputs: Sequence[Any], context=None) -> tuple[Any, CompiledStats]:
    """Lower and compile `jstep` on ShapeDtypeStructs (carrying shardings over topology devices),
    inside `context` (the mesh + logical-axis rules the loop traces under)."""
    with context if context is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        lowered = jstep.lower(*abstract_inputs)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    cost = _cost(compiled)
    return compiled, CompiledStats(memory=memory_stats(compiled), flops_per_chip=float(cost.get("flops", 0.0)),
                                   bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
                                   lower_s=t1 - t0, compile_s=t2 - t1, input_shardings=compiled.input_shardings)
