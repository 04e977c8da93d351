"""Two JAX processes on localhost (gloo CPU collectives) train like one process."""
import os
import subprocess
import sys

import jax
import numpy as np
from train_toy_stage import ToyStage, toy_config

from sgt_jax.train import checkpoint as ckpt_lib
from sgt_jax.train import mesh as mesh_lib
from sgt_jax.train import state as state_lib
from sgt_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def test_two_processes_match_single_process(tmp_path):
    steps = 6
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), "-n", "2",
           "--devices_per_process", "2", "--log_dir", str(tmp_path / "logs"), "--",
           os.path.join(TESTS, "train_toy_main.py"),
           "--config=" + os.path.join(TESTS, "train_toy_config.py") + f":steps={steps},every=3",
           f"--workdir={tmp_path / 'mp'}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    logs = {i: (tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)}
    assert out.returncode == 0, (out.stderr[-2000:], logs[0][-3000:], logs[1][-3000:])
    assert "process 1 of 2, 2 local / 4 global devices" in logs[1]
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 4 devices (2 processes)" in logs[0]
    data_dir = tmp_path / "mp" / "checkpoints" / str(steps) / "data"
    assert sorted(p.name for p in data_dir.iterdir() if p.suffix == ".json") == \
        ["process_0-of-2.json", "process_1-of-2.json"]

    # Reference: one process, 8 devices, same global batches.
    cfg = toy_config(tensorboard=False)
    cfg.train.steps = steps
    cfg.checkpoint.every_steps = 3
    ref = train(cfg, str(tmp_path / "single"), stage=ToyStage(cfg))

    stage = ToyStage(cfg)
    setup = state_lib.setup_state(stage, cfg, mesh_lib.make_mesh((-1, 1, 1)), jax.random.key(0),
                                  stage.dummy_batch(16), materialize=False)
    ck = ckpt_lib.Checkpointer(str(tmp_path / "mp" / "checkpoints"), read_only=True)
    mp_state, meta, step = ck.restore(setup.abstract)
    ck.close()
    assert step == steps and meta["process_count"] == 2
    assert float(mp_state.model_state["seen"]) == steps * cfg.train.batch_size
    # Same data, same rng; only the all-reduce order differs (4 vs 8 devices, gloo vs in-process).
    for a, b in zip(jax.tree.leaves(jax.device_get(ref.state.params)), jax.tree.leaves(jax.device_get(mp_state.params)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
