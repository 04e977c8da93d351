"""Config schema and validation: every bad field raises one ConfigError naming field, value, allowed."""
import glob
import os
import subprocess
import sys

import ml_collections
import pytest

from sgt_jax.config import ConfigError, config_module, default_config, parse_arg, resolve_mesh_shape, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _err(cfg, num_devices=8) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg, num_devices)
    return str(e.value)


def test_defaults_are_valid():
    assert validate(default_config(), 8) is not None
    assert validate(default_config()) is not None  # without a device count: schema + field rules only


def test_unknown_field_names_field_value_and_allowed():
    cfg = default_config()
    cfg.train.bacth_size = 64  # typo
    msg = _err(cfg)
    assert "train.bacth_size" in msg and "64" in msg and "batch_size" in msg
    cfg = default_config()
    cfg.optimizer = {"lr": 1.0}
    msg = _err(cfg)
    assert "'optimizer'" in msg and "optim" in msg


@pytest.mark.parametrize("path,value,expected", [
    ("train.steps", "100", "int"),
    ("train.remat", 1, "bool"),
    ("optim.lr", "3e-4", "float"),
    ("mesh.shape", 8, "tuple"),
])
def test_wrong_type(path, value, expected):
    # ConfigDict refuses type changes on assignment, but a config file can rebuild a section.
    cfg = default_config()
    section, leaf = path.split(".")
    d = cfg[section].to_dict()
    d[leaf] = value
    cfg[section] = ml_collections.ConfigDict(d)
    msg = _err(cfg)
    assert f"'{path}'" in msg and repr(value) in msg and expected in msg


def test_choice_fields():
    cfg = default_config()
    cfg.optim.schedule = "linear"
    msg = _err(cfg)
    assert "'optim.schedule'" in msg and "'linear'" in msg and "'cosine'" in msg
    cfg = default_config()
    cfg.stage = "gan"
    msg = _err(cfg)
    assert "'stage'" in msg and "'gan'" in msg and "'vq'" in msg


def test_mesh_shape_against_device_count():
    assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert resolve_mesh_shape((-1, 2, 2), 8) == (2, 2, 2)
    assert resolve_mesh_shape((1, -1, 1), 1) == (1, 1, 1)
    cfg = default_config()
    cfg.mesh.shape = (4, 1, 1)
    msg = _err(cfg, 8)
    assert "'mesh.shape'" in msg and "(4, 1, 1)" in msg and "8" in msg and "allowed" in msg
    cfg.mesh.shape = (-1, 3, 1)
    msg = _err(cfg, 8)
    assert "'mesh.shape'" in msg and "not divisible by 3" in msg
    cfg.mesh.shape = (-1, -1, 1)
    assert "at most one -1" in _err(cfg, 8)
    cfg.mesh.shape = (2, 2)
    assert "3 entries" in _err(cfg, 8)
    cfg.mesh.shape = (4, 1, 1)
    validate(cfg, 4)  # the same config is fine on 4 devices


def test_batch_divisibility():
    cfg = default_config()
    cfg.train.batch_size = 12
    msg = _err(cfg, 8)
    assert "'train.batch_size'" in msg and "12" in msg and "multiple of data x fsdp = 8" in msg
    cfg.mesh.shape = (2, 2, 2)  # data x fsdp = 4 divides 12
    validate(cfg, 8)
    cfg = default_config()
    cfg.train.batch_size, cfg.optim.grad_accum_steps = 32, 3
    msg = _err(cfg, 8)
    assert "'train.batch_size'" in msg and "grad_accum_steps (3)" in msg
    cfg.optim.grad_accum_steps = 8  # 32 / 8 = 4 rows per micro-batch, not a multiple of 8 devices
    assert "x grad_accum_steps 8" in _err(cfg, 8)
    cfg.optim.grad_accum_steps = 4
    validate(cfg, 8)


@pytest.mark.parametrize("task", ["bogus", "proxy_bogus", "segmentation"])
def test_unknown_task_or_proxy(task):
    cfg = default_config()
    cfg.data.mixture = {task: 1.0}
    msg = _err(cfg)
    assert f"'data.mixture.{task}'" in msg and "proxy_segmentation" in msg and "understanding" in msg


@pytest.mark.parametrize("weight", [0.0, -1.0, 0])
def test_mixture_weight_must_be_positive(weight):
    cfg = default_config()
    cfg.data.mixture = {"understanding": 1.0, "proxy_depth": weight}
    msg = _err(cfg)
    assert "'data.mixture.proxy_depth'" in msg and repr(weight) in msg and "> 0" in msg


def test_field_rules():
    cases = [("optim.lr", 0.0, "> 0"), ("train.steps", 0, "> 0"), ("optim.ema_decay", 1.0, "decay < 1"),
             ("model.vq.downsample", 5, "divisor"), ("data.image_size", 40, "multiple of 16")]
    for path, value, allowed in cases:
        cfg = default_config()
        *sections, leaf = path.split(".")
        node = cfg
        for s in sections:
            node = node[s]
        node[leaf] = value
        msg = _err(cfg)
        assert f"'{path}'" in msg and repr(value) in msg and allowed in msg, (path, msg)


def test_parse_arg():
    assert dict(parse_arg(None)) == {}
    opts = parse_arg("smoke,proxy=segmentation,steps=20,lr=3e-4")
    assert opts.smoke is True and opts.proxy == "segmentation" and opts.steps == 20 and opts.lr == 3e-4


# Options a config file requires (anything else runs with arg=None).
_REQUIRED_ARGS = {"post_shapes.py": "proxy=segmentation", "ablation_shapes.py": "proxy=segmentation"}


def _config_files():
    return sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", _config_files(), ids=os.path.basename)
def test_experiment_configs_validate(path):
    name = os.path.basename(path)
    mod = config_module(path)
    arg = _REQUIRED_ARGS.get(name)
    validate(mod.get_config(arg))  # full-size configs target real meshes; device checks apply at launch
    with open(path) as f:
        has_smoke = "smoke" in f.read()
    if has_smoke:  # smoke variants must run in tests on 8 simulated devices
        validate(mod.get_config(",".join(a for a in (arg, "smoke") if a)), 8)


def test_train_cli_rejects_bad_config_before_building(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"),
           "--config=" + os.path.join(ROOT, "tests", "train_toy_config.py"), f"--workdir={tmp_path / 'w'}",
           "--config.train.batch_size=12"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "invalid config" in out.stderr and "'train.batch_size' = 12" in out.stderr
    assert not (tmp_path / "w").exists()  # nothing was built or written
