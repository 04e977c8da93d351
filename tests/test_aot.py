"""TPU AOT compile with libtpu on this CPU-only machine (sgt_jax/train/aot.py, tools/dry_run.py
--topology): the real TPU compiler's memory numbers are positive and the jit shardings hold."""
import json
import os
import subprocess
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # off GCP: libtpu must not query the metadata server
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the tool's subprocess loads libtpu too

import jax  # noqa: E402
import pytest  # noqa: E402
from train_toy_stage import ToyStage, toy_config  # noqa: E402

from sgt_jax.train import aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_lib as bench  # noqa: E402  (tools/bench_lib.py: the dry run's build)

_MISSING = aot.libtpu_missing_reason()
needs_libtpu = pytest.mark.skipif(_MISSING is not None, reason=f"TPU compiler unavailable: {_MISSING}")


def test_topology_names_are_checked():
    assert aot.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4)) and aot.chips("v5e:16x16") == 256
    assert aot.hbm_bytes("v6e:8x8") == 32 * aot.GiB
    for bad in ("v5p", "v5p:4x4x", "h100:8", "v5p-64"):
        with pytest.raises(ValueError, match="not GENERATION"):
            aot.parse_topology(bad)


@needs_libtpu
def test_toy_step_compiles_for_v5p_with_its_shardings():
    devices = aot.topology_devices("v5p:2x2x1")
    assert len(devices) == 4 and devices[0].platform == "tpu"
    cfg = toy_config()
    cfg.mesh.shape = (1, 2, 2)
    cfg.train.batch_size = 4
    built = bench.build(cfg, name="toy", materialize=False, stage=ToyStage(cfg), devices=devices)
    _, st = aot.compile_step(built.jstep, built.abstract_inputs(), built.context())
    for k in ("argument", "output", "temp", "generated_code", "peak"):
        assert st.memory[k] > 0, (k, st.memory)
    assert st.flops_per_chip > 0 and st.compile_s > 0
    applied = jax.tree.leaves(st.input_shardings[0][0])
    wanted = jax.tree.leaves(built.setup.shardings)
    assert len(applied) == len(wanted)
    specs = set()
    for a, w, leaf in zip(applied, wanted, jax.tree.leaves(built.setup.abstract), strict=True):
        assert a.is_equivalent_to(w, len(leaf.shape)), (a, w)
        specs.add(str(w.spec))
    assert any("fsdp" in s for s in specs), specs  # not everything replicated


def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
    env.pop("JAX_PLATFORMS", None)  # the tool sets it itself
    return subprocess.run([sys.executable, "tools/dry_run.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@needs_libtpu
def test_dry_run_tool_compiles_umm_smoke_for_a_topology(tmp_path):
    proc = _run(["--config=configs/umm_1b.py:smoke", "--topology=v5e:2x2", "--batch_per_device=1",
                 f"--out={tmp_path / 'dry'}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TPU compiler" in proc.stdout and "FITS" in proc.stdout
    (rep,) = json.loads((tmp_path / "dry.json").read_text())
    assert rep["chips"] == 4 and rep["device_kind"] == "TPU v5 lite" and rep["hbm_bytes"] == 16 * aot.GiB
    assert rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and rep["global_batch"] == 4
    assert rep["state_shardings_applied"] is True
    m = rep["memory"]
    assert m["argument"] > 0 and m["temp"] > 0 and m["generated_code"] > 0 and 0 < m["peak"] < rep["hbm_bytes"]
    assert rep["flops_per_chip_compiled"] > 0 and rep["flops_per_chip_analytic"] > 0
    assert "| configs/umm_1b.py:smoke | v5e:2x2 |" in (tmp_path / "dry.md").read_text()


def test_dry_run_tool_rejects_a_bad_topology():
    proc = _run(["--config=configs/umm_1b.py:smoke", "--topology=v5p-64"], timeout=120)
    assert proc.returncode == 2 and "v5p-64" in proc.stderr and "GENERATION" in proc.stderr
