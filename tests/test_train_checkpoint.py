"""Checkpointing: exact resume, restore onto other meshes, SIGTERM save, keep-N/best, init_from."""
import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from train_toy_stage import ToyStage, toy_config
from xla_env import xla_flags

from sgt_jax.train import checkpoint as ckpt_lib
from sgt_jax.train import mesh as mesh_lib
from sgt_jax.train import state as state_lib
from sgt_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _assert_bitwise(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(_host(a))[0], jax.tree.leaves(_host(b)), strict=True):
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def _subprocess_env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")])
    return env


def test_exact_resume_matches_straight_run(tmp_path):
    cfg = toy_config(tensorboard=False)  # 8 steps, checkpoint every 4
    straight = train(cfg, str(tmp_path / "a"), stage=ToyStage(cfg))
    # Interrupted twice: by the wall-clock limit right after step 1 (off the checkpoint schedule),
    # then by a step budget at 4; each re-run resumes from the latest checkpoint.
    limited = toy_config(tensorboard=False, max_wall_minutes=1e-9)
    first = train(limited, str(tmp_path / "b"), stage=ToyStage(limited))
    assert first.step == 1 and first.stop_reason == "wall_clock"
    second = train(cfg, str(tmp_path / "b"), stage=ToyStage(cfg), max_steps=4)
    assert second.resumed_from == 1 and second.step == 4 and second.stop_reason == "max_steps"
    resumed = train(cfg, str(tmp_path / "b"), stage=ToyStage(cfg))
    assert resumed.resumed_from == 4 and resumed.step == 8
    assert straight.train_step_compiles == 1 and resumed.train_step_compiles == 1
    # Params, optimizer moments, model state (examples seen) and counters: bit for bit.
    _assert_bitwise(straight.state.to_tree(), resumed.state.to_tree())
    assert straight.metrics["train/loss"] == resumed.metrics["train/loss"]  # same data order after restart
    assert float(resumed.state.model_state["seen"]) == 8 * cfg.train.batch_size


def _save_on_8x1x1(tmp_path):
    cfg = toy_config(tensorboard=False)
    cfg.mesh.shape = (8, 1, 1)
    cfg.train.steps = 3
    res = train(cfg, str(tmp_path), stage=ToyStage(cfg))
    return cfg, res


def test_restore_onto_different_mesh(tmp_path):
    cfg, res = _save_on_8x1x1(tmp_path)
    saved = _host(res.state.to_tree())
    np.savez(tmp_path / "expected.npz", **{k: v for k, v in ckpt_lib._flat(saved["params"]).items()})

    # 2x2x2 on the same 8 devices: tensor/fsdp-sharded leaves now.
    stage = ToyStage(cfg)
    mesh = mesh_lib.make_mesh((2, 2, 2))
    setup = state_lib.setup_state(stage, cfg, mesh, jax.random.key(0), stage.dummy_batch(16), materialize=False)
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    restored, meta, step = ck.restore(setup.abstract)
    ck.close()
    assert step == 3 and meta["mesh_shape"] == {"data": 8, "fsdp": 1, "tensor": 1}
    k = restored.params["hidden"]["kernel"]
    assert k.sharding.mesh.shape == mesh.shape and k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(k.addressable_shards) == 8 and k.addressable_shards[0].data.shape == (4, 16)
    _assert_bitwise(saved, restored.to_tree())

    # One device, in a fresh process (device count is fixed per process).
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from train_toy_stage import ToyStage, toy_config
        from sgt_jax.train import checkpoint as C, mesh as M, state as S
        assert jax.device_count() == 1
        cfg = toy_config(tensorboard=False)
        cfg.mesh.shape = (1, 1, 1)
        stage = ToyStage(cfg)
        setup = S.setup_state(stage, cfg, M.make_mesh((1, 1, 1)), jax.random.key(0), stage.dummy_batch(16),
                              materialize=False)
        ck = C.Checkpointer({str(tmp_path / "checkpoints")!r}, read_only=True)
        st, meta, step = ck.restore(setup.abstract)
        ck.close()
        exp = np.load({str(tmp_path / "expected.npz")!r})
        got = C._flat(jax.device_get(st.params))
        assert sorted(exp.files) == sorted(got), (exp.files, sorted(got))
        for name in exp.files:
            assert exp[name].tobytes() == np.asarray(got[name]).tobytes(), name
        print("RESTORED_ON_ONE_DEVICE", step)
    """)
    out = subprocess.run([sys.executable, "-c", script], env=_subprocess_env(1), capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESTORED_ON_ONE_DEVICE 3" in out.stdout


def test_sigterm_saves_then_exits(tmp_path):
    workdir = tmp_path / "run"
    # No periodic save (every=10**6): the only checkpoint can be the preemption save.
    cmd = [sys.executable, os.path.join(TESTS, "train_toy_main.py"),
           "--config=" + os.path.join(TESTS, "train_toy_config.py") + ":steps=1000000,every=1000000",
           f"--workdir={workdir}", "--config.checkpoint.keep=2"]
    proc = subprocess.Popen(cmd, env=_subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    seen_step, head = None, []
    try:
        for line in proc.stdout:  # blocks until the child logs a training step (no clock involved)
            head.append(line)
            m = re.search(r"\] \[(\d+)\] ", line)
            if m:
                seen_step = int(m.group(1))
                break
        assert seen_step is not None, "".join(head)[-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(head) + out
    assert proc.returncode == 0, out[-3000:]
    ckdir = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert len(steps) == 2 and steps[0] == 0, steps  # the starting state, then exactly the preemption save
    last = steps[1]
    assert last >= seen_step and f"preempted at step {last}" in out
    # Restorable, including the data iterator.
    cfg = toy_config(tensorboard=False)
    stage = ToyStage(cfg)
    setup = state_lib.setup_state(stage, cfg, mesh_lib.make_mesh((-1, 1, 1)), jax.random.key(0),
                                  stage.dummy_batch(16), materialize=False)
    ck = ckpt_lib.Checkpointer(str(ckdir), read_only=True)
    it = stage.make_iterator("train", global_batch_size=16, process_index=0, process_count=1, seed=0)
    st, meta, step = ck.restore(setup.abstract, data_iter=it)
    ck.close()
    assert step == last and int(st.step) == last
    assert meta["stage"] == "vq" and "config" in meta and "jax" in meta["versions"]


def test_keep_latest_and_best(tmp_path):
    cfg = toy_config(tensorboard=False)
    stage = ToyStage(cfg)
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    setup = state_lib.setup_state(stage, cfg, mesh, jax.random.key(0), stage.dummy_batch(16))
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2, best_metric="eval/acc", best_mode="max", async_save=True)
    accs = {1: 0.9, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.15}
    for s, acc in accs.items():
        ck.save(s, setup.state.replace(step=setup.state.step + s), metrics={"eval/acc": acc})
        ck.confirm(s)  # the loop confirms a step once a finite update followed it
    ck.wait()
    # Latest two confirmed (3, 4) plus best two by accuracy (1: 0.9, 4: 0.3), plus 5, which was not yet
    # confirmed when the manager pruned at its save (a newest step never prunes a confirmed one).
    assert ck.all_steps() == [1, 3, 4, 5]
    assert ck.best_step() == 1
    ck.close()

    ck = ckpt_lib.Checkpointer(str(tmp_path / "min"), keep=1, best_metric="loss", best_mode="min")
    for s, loss in {1: 0.5, 2: 0.1, 3: 0.7}.items():
        ck.save(s, setup.state, metrics={"loss": loss})
        ck.confirm(s)
    ck.wait()
    assert ck.all_steps() == [2, 3]
    ck.close()


def test_init_from_with_mapping(tmp_path):
    src_cfg, _ = _save_on_8x1x1(tmp_path / "src")
    saved = ckpt_lib.Checkpointer(str(tmp_path / "src" / "checkpoints"), read_only=True)
    stage = ToyStage(src_cfg)
    mesh = mesh_lib.make_mesh((2, 2, 2))
    setup = state_lib.setup_state(stage, src_cfg, mesh, jax.random.key(7), stage.dummy_batch(16))
    src_state, _, _ = saved.restore(setup.abstract)
    saved.close()
    fresh = setup.state.params
    params, loaded = ckpt_lib.load_params(str(tmp_path / "src"), fresh, mapping="hidden->hidden, out->out")
    assert loaded == ["hidden/bias", "hidden/kernel", "out/bias", "out/kernel"]
    _assert_bitwise(params["hidden"], src_state.params["hidden"])
    _assert_bitwise(params["frozen_in"], fresh["frozen_in"])  # not mapped: keeps its init
    assert params["hidden"]["kernel"].sharding == fresh["hidden"]["kernel"].sharding
    # Prefix renaming: load the source 'out' layer into a differently named destination subtree.
    renamed = {"head": fresh["out"]}
    params2, loaded2 = ckpt_lib.load_params(str(tmp_path / "src"), renamed, mapping="out->head")
    assert loaded2 == ["head/bias", "head/kernel"]
    _assert_bitwise(params2["head"], src_state.params["out"])
    with pytest.raises(ValueError, match="no destination parameter matched"):
        ckpt_lib.load_params(str(tmp_path / "src"), {"nothing": fresh["out"]}, mapping="")
    with pytest.raises(FileNotFoundError, match="init_from.path"):
        ckpt_lib.load_params(str(tmp_path / "missing"), fresh)
