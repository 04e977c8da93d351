"""Faults a long run meets: corrupt checkpoints, divergence, a second run on the same workdir,
replayed steps after a resume, and errors that name the file. Every test runs the real loop on the
toy stage (milliseconds per step)."""
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_toy_stage import ToyStage, toy_config
from xla_env import xla_flags

from sgt_jax.train import checkpoint as ckpt_lib
from sgt_jax.train import mesh as mesh_lib
from sgt_jax.train import state as state_lib
from sgt_jax.train import workdir_lock
from sgt_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _env(devices: int = 2) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")])
    return env


def _toy_main(workdir, *flags, config_arg="steps=8,every=4"):
    cmd = [sys.executable, os.path.join(TESTS, "train_toy_main.py"),
           "--config=" + os.path.join(TESTS, "train_toy_config.py") + ":" + config_arg, f"--workdir={workdir}",
           *flags]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def _finite_tree(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(jax.device_get(tree))
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def _restore(ckdir, step=None):
    cfg = toy_config(tensorboard=False)
    stage = ToyStage(cfg)
    setup = state_lib.setup_state(stage, cfg, mesh_lib.make_mesh((-1, 1, 1)), jax.random.key(0),
                                  stage.dummy_batch(16), materialize=False)
    ck = ckpt_lib.Checkpointer(str(ckdir), read_only=True)
    try:
        return ck.restore(setup.abstract, step=step)
    finally:
        ck.close()


def _largest_file(directory) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


# ---------------------------------------------------------------------------------------------
# 1. corrupt checkpoint bytes -> fall back to the previous step, training continues finite
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["random_bytes", "arrays_that_decode"])
def test_corrupt_array_bytes_fall_back_to_the_previous_step(tmp_path, caplog, damage):
    wd = str(tmp_path / "run")
    cfg = toy_config(tensorboard=False)  # 8 steps, checkpoints at 4 and 8
    train(cfg, wd, stage=ToyStage(cfg))
    state8 = os.path.join(wd, "checkpoints", "8", "state")
    if damage == "random_bytes":  # into the middle of the (merged OCDBT) array data: a read error
        target = _largest_file(os.path.join(state8, "d"))
        size = os.path.getsize(target)
        with open(target, "r+b") as f:
            f.seek(size // 2 - 32)
            f.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    else:  # well-formed arrays with other values (what bit rot inside raw data looks like): checksums
        shutil.rmtree(state8)
        shutil.copytree(os.path.join(wd, "checkpoints", "4", "state"), state8)

    longer = toy_config(tensorboard=False)
    longer.train.steps = 12
    with caplog.at_level(logging.WARNING):
        res = train(longer, wd, stage=ToyStage(longer))
    assert res.resumed_from == 4 and res.step == 12
    assert "checkpoint step 8 item 'state'" in caplog.text and "fell back to checkpoint step 4" in caplog.text
    if damage == "arrays_that_decode":
        assert "checksum mismatch in" in caplog.text
    assert _finite_tree(res.state.params) and _finite_tree(res.state.opt_state)
    assert np.isfinite(res.metrics["train/loss"])
    rejected = os.listdir(os.path.join(wd, ckpt_lib.REJECTED_DIR))
    assert [r.split("-")[0] for r in rejected] == ["8"]  # moved aside, not deleted
    state, _, step = _restore(os.path.join(wd, "checkpoints"))
    assert step == 12 and _finite_tree(state.params)


def test_checksum_detects_a_changed_value_and_names_the_array(tmp_path):
    cfg = toy_config(tensorboard=False)
    stage = ToyStage(cfg)
    setup = state_lib.setup_state(stage, cfg, mesh_lib.make_mesh((-1, 1, 1)), jax.random.key(0),
                                  stage.dummy_batch(16))
    tree = setup.state.to_tree()
    a = ckpt_lib.state_integrity(tree)
    flipped = dict(tree, params={**tree["params"], "hidden": {**tree["params"]["hidden"],
                                                               "bias": tree["params"]["hidden"]["bias"].at[3].add(1e-7)}})
    b = ckpt_lib.state_integrity(flipped)
    diff = [k for k in a["checksums"] if a["checksums"][k] != b["checksums"][k]]
    assert diff == ["params/hidden/bias"]
    # The same values on another mesh give the same checksums (integer sums are order-free).
    other = state_lib.setup_state(stage, cfg, mesh_lib.make_mesh((2, 2, 2)), jax.random.key(0),
                                  stage.dummy_batch(16))
    assert ckpt_lib.state_integrity(other.state.to_tree())["checksums"] == a["checksums"]


# ---------------------------------------------------------------------------------------------
# 2. divergence: no non-finite update is applied, saves pause, the stop names a finite checkpoint
# ---------------------------------------------------------------------------------------------
def test_lr_1e30_stops_with_a_finite_checkpoint_and_a_sane_resume_trains(tmp_path, caplog):
    wd = tmp_path / "run"
    sane = toy_config(tensorboard=False)
    sane.train.steps, sane.checkpoint.every_steps = 4, 2
    train(sane, str(wd), stage=ToyStage(sane))

    from sgt_jax.train.loop import TrainingDiverged
    wild = toy_config(tensorboard=False)
    wild.train.steps, wild.checkpoint.every_steps, wild.optim.lr = 40, 2, 1e30
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingDiverged) as e:
        train(wild, str(wd), stage=ToyStage(wild))
    assert "The newest finite checkpoint is step 4" in str(e.value)
    assert "checkpoint paused" in caplog.text  # no save during the skip streak
    for step_dir in sorted(p for p in (wd / "checkpoints").iterdir() if p.name.isdigit()):
        state, _, _ = _restore(wd / "checkpoints", step=int(step_dir.name))
        assert _finite_tree(state.params) and _finite_tree(state.opt_state), step_dir
        assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(state.params)) < 1e3, step_dir

    resumed = toy_config(tensorboard=False)
    resumed.train.steps = 12
    res = train(resumed, str(wd), stage=ToyStage(resumed))
    assert res.resumed_from == 4 and res.step == 12
    assert res.metrics["train/total_skips"] == 0 and np.isfinite(res.metrics["train/loss"])


def test_lr_1e30_from_scratch_stops_with_the_initial_checkpoint_left(tmp_path):
    out = _toy_main(tmp_path, "--config.optim.lr=1e30", config_arg="steps=40,every=2")
    text = out.stdout + out.stderr
    assert out.returncode == 3, text[-3000:]
    # Step 2 took the first full-lr update (finite, ~1e30) and was saved; nothing finite followed it.
    assert "Checkpoint step(s) [2] were followed only by non-finite steps" in text
    assert "The newest finite checkpoint is step 0" in text
    # What is left is the starting state (step 0, saved before any update): finite and sane.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["0"]
    assert [p.name.split("-")[0] for p in (tmp_path / ckpt_lib.REJECTED_DIR).iterdir()] == ["2"]
    state, _, step = _restore(tmp_path / "checkpoints")
    assert step == 0 and _finite_tree(state.params) and _finite_tree(state.opt_state)
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(state.params)) < 1e3
    # Re-running with a sane lr resumes from it and trains finite.
    out = _toy_main(tmp_path, config_arg="steps=6,every=2")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "resumed from" in out.stderr + out.stdout
    state, _, step = _restore(tmp_path / "checkpoints")
    assert step == 6 and _finite_tree(state.params)


def test_a_non_finite_update_is_never_applied():
    """The guard judges the result (params, optimizer state), not only loss and gradients."""
    from sgt_jax.train import step as step_lib
    cfg = toy_config(tensorboard=False)
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = 1e39, 0, "constant"  # above float32's max
    stage = ToyStage(cfg)
    mesh = mesh_lib.make_mesh((-1, 1, 1))
    setup = state_lib.setup_state(stage, cfg, mesh, jax.random.key(0), stage.dummy_batch(16))
    fn = jax.jit(step_lib.make_train_step(stage, cfg, setup.tx, setup.labels, mesh))
    batch = jax.tree.map(lambda x: np.asarray(x), next(stage.make_iterator(
        "train", global_batch_size=16, process_index=0, process_count=1, seed=0)))
    before = jax.device_get(setup.state.params)
    with jax.set_mesh(mesh):
        new, metrics = fn(setup.state, batch, jax.random.key(1))
    # loss and gradients are finite, but the update (lr = inf in float32) is not.
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["skipped"]) == 1.0 and int(new.consecutive_skips) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new.params)), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# ---------------------------------------------------------------------------------------------
# 3. one run per workdir
# ---------------------------------------------------------------------------------------------
def test_second_run_on_a_locked_workdir_exits_2_and_writes_nothing(tmp_path):
    wd = tmp_path / "run"
    lock = workdir_lock.acquire(str(wd))  # this process is "the first run"
    try:
        out = _toy_main(wd)
    finally:
        lock.release()
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert f"another run holds this workdir ({os.uname().nodename}, pid {os.getpid()})" in text
    assert sorted(os.listdir(wd)) == [".lock"]  # no train.log, no checkpoints/, no metrics rows


def test_a_stale_lock_of_a_dead_pid_is_reclaimed(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # An orphan still holds the flock (it inherited the descriptor) but the pid in the file is dead.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(wd / '.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (wd / ".lock").write_text(f"{os.uname().nodename} {dead.pid}\n")
        lock = workdir_lock.acquire(str(wd))
        assert (wd / ".lock").read_text().split() == [os.uname().nodename, str(os.getpid())]
        lock.release()
        # A live holder is not reclaimed.
        (wd / ".lock").unlink()
        holder.kill()
        holder.wait()
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, time\n"
                                   f"f = open({str(wd / '.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                                   "f.write(os.uname().nodename + ' ' + str(os.getpid())); f.flush()\n"
                                   "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {holder.pid}"):
            workdir_lock.acquire(str(wd))
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# 6. replayed steps are not logged twice
# ---------------------------------------------------------------------------------------------
def test_metrics_rows_are_not_duplicated_after_a_resume(tmp_path):
    wd = tmp_path / "run"
    cfg = toy_config(tensorboard=False, log_every=1)
    cfg.train.steps = 6  # checkpoints at 4 and (final) 6
    train(cfg, str(wd), stage=ToyStage(cfg))
    shutil.rmtree(wd / "checkpoints" / "6")  # as if killed before the last save: 5 and 6 replay
    cfg.train.steps = 8
    train(cfg, str(wd), stage=ToyStage(cfg))
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, 9))


# ---------------------------------------------------------------------------------------------
# 5. errors that name the problem
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["state/_METADATA", "data/process_0-of-1.json", "metadata/metadata"])
def test_corrupt_json_names_the_file_and_falls_back(tmp_path, caplog, victim):
    wd = tmp_path / "run"
    cfg = toy_config(tensorboard=False)
    train(cfg, str(wd), stage=ToyStage(cfg))  # checkpoints 4 and 8
    bad = wd / "checkpoints" / "8" / victim
    bad.write_text(bad.read_text()[: len(bad.read_text()) // 2])  # cut mid-write
    with caplog.at_level(logging.WARNING):
        res = train(cfg, str(wd), stage=ToyStage(cfg))
    assert res.resumed_from == 4 and res.step == 8
    assert str(bad) in caplog.text and "fell back to checkpoint step 4" in caplog.text


def test_corrupt_json_of_the_only_checkpoint_exits_2_naming_it(tmp_path):
    wd = tmp_path / "run"
    no_step0 = "--config.checkpoint.save_initial=False"  # step 4 is the only checkpoint
    assert _toy_main(wd, no_step0, config_arg="steps=4,every=4").returncode == 0
    bad = wd / "checkpoints" / "4" / "state" / "_METADATA"
    bad.write_text("{not json")
    out = _toy_main(wd, no_step0, config_arg="steps=8,every=4")
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "cannot resume" in text and str(bad) in text and "no step verifies" in text
    assert "JSONDecodeError" in text and "Traceback" not in text


def test_resume_with_another_model_shape_names_paths_and_fields(tmp_path, monkeypatch):
    import train_toy_stage
    wd = tmp_path / "run"
    cfg = toy_config(tensorboard=False)
    cfg.train.steps = 4
    train(cfg, str(wd), stage=ToyStage(cfg))
    monkeypatch.setattr(train_toy_stage, "HIDDEN", 48)  # the toy model reads its width at trace time
    wider = toy_config(tensorboard=False)
    wider.train.steps = 8
    wider.model.vq.width = 48  # the config field a real stage would read
    with pytest.raises(ckpt_lib.CheckpointMismatch) as e:
        train(wider, str(wd), stage=ToyStage(wider))
    msg = str(e.value)
    assert "params/hidden/kernel: checkpoint (8, 32) vs model (8, 48)" in msg
    assert "config fields that differ from the run's: model.vq.width=128 -> 48" in msg
    assert "strict" not in msg
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["0", "4"]  # nothing moved or pruned


def test_resuming_a_good_checkpoint_with_a_broken_lr_keeps_it(tmp_path):
    from sgt_jax.train.loop import TrainingDiverged
    wd = tmp_path / "run"
    cfg = toy_config(tensorboard=False)
    cfg.train.steps = 4
    train(cfg, str(wd), stage=ToyStage(cfg))
    broken = toy_config(tensorboard=False, max_consecutive_skips=3)
    broken.train.steps, broken.optim.lr = 20, 1e39  # every update is inf: none is ever applied
    with pytest.raises(TrainingDiverged, match="newest finite checkpoint is step 4"):
        train(broken, str(wd), stage=ToyStage(broken))
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["0", "4"]
    assert not (wd / ckpt_lib.REJECTED_DIR).exists()


def test_unconfirmed_newest_steps_never_prune_a_confirmed_one(tmp_path):
    cfg = toy_config(tensorboard=False)
    stage = ToyStage(cfg)
    setup = state_lib.setup_state(stage, cfg, mesh_lib.make_mesh((-1, 1, 1)), jax.random.key(0),
                                  stage.dummy_batch(16))
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
    ck.save(1, setup.state)
    ck.confirm(1)  # a finite update followed step 1
    for s in (2, 3):  # nothing finite followed these (a divergence in the making)
        ck.save(s, setup.state.replace(step=setup.state.step + s))
    ck.wait()
    assert ck.all_steps() == [1, 2, 3] and ck.newest_confirmed() == 1
    assert ck.reject_unconfirmed() == [2, 3]
    assert ck.all_steps() == [1]
    ck.close()


def test_object_store_workdirs_take_no_lock_and_say_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert workdir_lock.acquire("gs://some-bucket/run") is None
    assert "no workdir lock is taken" in caplog.text
