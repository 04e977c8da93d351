"""Where a measurement came from: the source commit and the host CPU, recorded beside the numbers.

Imports neither jax nor TensorFlow, so any tool can stamp its output before its backend starts.
"""
from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(short: bool = False, root: str = ROOT) -> str:
    """HEAD of the checkout at `root`, marked when the tree has uncommitted changes; "unknown"
    outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def host_cpu() -> dict:
    """The host CPU's model and widest vector ISA, from /proc/cpuinfo (Linux; empty elsewhere).

    This project's CPU boxes change between days (the same matmul ran at 60 to 400 GFLOP/s, and
    the LM-vs-torch ratio moved from 1.11x to 0.74x), so a ratio is only comparable with ratios
    measured on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    isa = next((name for name in ("amx_tile", "avx512f", "avx2", "avx") if name in flags), "")
    return {"cpu_model": model, "cpu_isa": isa}
