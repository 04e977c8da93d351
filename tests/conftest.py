"""Tests run on CPU with 8 simulated devices so sharding code paths are exercised.

A persistent JAX compilation cache (shared with the subprocesses tests start) keeps the suite fast:
many tests compile the same small programs.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from xla_env import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import importlib.util  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def load_tool():
    """Import a script from tools/ as a module; the absl flags it defines are removed afterwards, so
    two tests that load tools defining the same flag name (e.g. --workdir) work in any order."""
    from absl import flags

    added: list[str] = []

    def load(name: str):
        before = set(flags.FLAGS)
        spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(_ROOT, "tools", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        added.extend(sorted(set(flags.FLAGS) - before))
        return module

    yield load
    for name in added:
        if name in flags.FLAGS:
            delattr(flags.FLAGS, name)
