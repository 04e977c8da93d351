"""Config schema, derived fields and validation: every bad field raises one ConfigError naming field,
value and what is allowed; derived fields follow the fields they come from after overrides."""
import glob
import os
import subprocess
import sys

import ml_collections
import pytest
from xla_env import xla_flags

from sgt_jax.checks import prepare, validate
from sgt_jax.config import (
    ConfigError,
    config_module,
    default_config,
    finalize,
    load_config,
    parse_arg,
    resolve_mesh_shape,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _err(cfg, num_devices=8) -> str:
    with pytest.raises(ConfigError) as e:
        prepare(cfg, num_devices)
    return str(e.value)


def test_defaults_are_valid_once_finalized():
    cfg = finalize(default_config())
    assert cfg.data.max_seq_len == 144 and cfg.model.umm.num_codes == 64 and cfg.model.umm.codebook_size == 1024
    validate(cfg, 8)
    validate(cfg)  # without a device count: schema + section rules only
    with pytest.raises(ConfigError, match="not finalized"):
        validate(default_config())  # derived fields still unset


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
    prepare(cfg, 4)  # the same config is fine on 4 devices


def test_batch_divisibility():
    cfg = default_config()
    cfg.train.batch_size = 12
    msg = _err(cfg, 8)
    assert "'train.batch_size'" in msg and "12" in msg and "multiple of data x fsdp = 8" in msg
    cfg.mesh.shape = (2, 2, 2)  # data x fsdp = 4 divides 12
    prepare(cfg, 8)
    cfg = default_config()
    cfg.train.batch_size, cfg.optim.grad_accum_steps = 32, 3
    msg = _err(cfg, 8)
    assert "'train.batch_size'" in msg and "grad_accum_steps (3)" in msg
    cfg.optim.grad_accum_steps = 8  # 32 / 8 = 4 rows per micro-batch, not a multiple of 8 devices
    assert "x grad_accum_steps 8" in _err(cfg, 8)
    cfg.optim.grad_accum_steps = 4
    prepare(cfg, 8)


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


@pytest.mark.parametrize("path,value", [("optim.lr", float("nan")), ("optim.lr", float("inf")),
                                        ("optim.b2", float("-inf")), ("data.cond_dropout", float("nan"))])
def test_numeric_fields_reject_nan_and_inf(path, value):
    cfg = default_config()
    section, leaf = path.split(".")
    cfg[section][leaf] = value
    msg = _err(cfg)
    assert f"'{path}'" in msg and "finite" in msg


def test_eval_umm_parts_and_splits_are_schema_rules():
    cfg = default_config()
    cfg.eval.umm.parts = ("cvbench", "gen_eval")
    msg = _err(cfg)
    assert "'eval.umm.parts'" in msg and "gen_eval" in msg and "geneval" in msg
    cfg = default_config()
    cfg.eval.umm.splits = ("dev",)
    assert "'eval.umm.splits'" in _err(cfg)


def test_section_rules_gan_weight_and_target_mix():
    cfg = default_config()
    cfg.model.vq.gan_weight = 0.5
    assert "'model.vq.gan_weight'" in _err(cfg)
    for mix, hint in (("recon:1", "'recon'"), ("depth:0", "weight 0"), ("depth:x", "'x'"), ("", "names no kind")):
        cfg = default_config()
        cfg.model.vq.target_mix = mix
        msg = _err(cfg)
        assert "'model.vq.target_mix'" in msg and hint in msg, msg


def test_umm_rules_apply_whatever_was_imported_before():
    """The num_kv_heads=3 case fails the same way in a fresh process and after the UMM stage (and
    so every model module) was imported: rules are listed in checks.py, not registered on import."""
    code = ("import sys\n{pre}\nfrom sgt_jax import checks, config\nc = config.default_config()\n"
            "c.model.umm.llm.num_kv_heads = 3\ntry:\n    checks.prepare(c)\nexcept config.ConfigError as e:\n"
            "    print('ERR', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
    outs = []
    for pre in ("", "import sgt_jax.train.stages.umm_stage"):
        out = subprocess.run([sys.executable, "-c", code.format(pre=pre)], env=env, capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        outs.append(out.stdout.strip())
    assert outs[0] == outs[1] and "'model.umm.llm.num_kv_heads' = 3" in outs[0], outs


def test_derived_fields_follow_overrides_and_cannot_be_set_by_hand():
    cfg = load_config(os.path.join(ROOT, "configs", "base_shapes.py"))
    at_32 = int(finalize(load_config(os.path.join(ROOT, "configs", "base_shapes.py"))).train.steps)
    cfg.train.batch_size = 64  # what --config.train.batch_size=64 does before finalize
    cfg.model.vq.downsample = 8
    cfg.model.vq.channel_mult = (1, 2, 2, 4)
    finalize(cfg)
    assert cfg.train.steps == -(-cfg.train.num_examples // 64) and at_32 == -(-cfg.train.num_examples // 32)
    assert cfg.model.umm.num_codes == 64  # (64 / 8)^2, not the 256 of the f4 VQ base_shapes was built with
    assert cfg.data.max_seq_len == 144  # 3 + 64 ViT + 72 answer room -> 139 -> 144
    finalize(cfg)  # idempotent
    for path, value in (("model.umm.num_codes", 100), ("data.max_seq_len", 512), ("model.umm.codebook_size", 7),
                        ("train.steps", 10)):
        cfg = load_config(os.path.join(ROOT, "configs", "base_shapes.py"))
        section, _, leaf = path.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = node[part]
        node[leaf] = value
        with pytest.raises(ConfigError) as e:
            finalize(cfg)
        assert f"'{path}' = {value}" in str(e.value) and "derived" in str(e.value)


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


def test_parse_arg_is_typed_and_strict():
    spec = dict(smoke=False, proxy="", steps=0, lr=1e-3)
    assert dict(parse_arg(None, **spec)) == spec
    opts = parse_arg("smoke,proxy=segmentation,steps=20,lr=3e-4", **spec)
    assert opts.smoke is True and opts.proxy == "segmentation" and opts.steps == 20 and opts.lr == 3e-4
    with pytest.raises(ConfigError, match="did you mean 'smoke'"):
        parse_arg("smok", **spec)
    with pytest.raises(ConfigError, match="'steps' = 'many'.*int"):
        parse_arg("steps=many", **spec)
    with pytest.raises(ConfigError, match="finite"):
        parse_arg("lr=nan", **spec)
    with pytest.raises(ConfigError, match="needs a value"):
        parse_arg("steps", **spec)


@pytest.mark.parametrize("spec,closest", [("vq_shapes.py:smok", "smoke"), ("base_shapes.py:vqarg=f8,stpes=3", "steps"),
                                          ("post_shapes.py:proxy=depth,rato=3", "ratio"),
                                          ("ablation_shapes.py:proxy=depth,sed=1", "seed"),
                                          ("umm_1b.py:tensr=2", "tensor"), ("umm_7b.py:smoek", "smoke")])
def test_every_config_file_rejects_unknown_options(spec, closest):
    with pytest.raises(ConfigError, match=f"did you mean '{closest}'"):
        load_config(os.path.join(ROOT, "configs", spec))


# Options a config file requires (anything else runs with arg=None).
_REQUIRED_ARGS = {"post_shapes.py": "proxy=segmentation", "ablation_shapes.py": "proxy=segmentation"}


def _config_files():
    return sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", _config_files(), ids=os.path.basename)
def test_experiment_configs_validate(path):
    name = os.path.basename(path)
    mod = config_module(path)
    arg = _REQUIRED_ARGS.get(name)
    prepare(mod.get_config(arg))  # full-size configs target real meshes; device checks apply at launch
    with open(path) as f:
        has_smoke = "smoke" in f.read()
    if has_smoke:  # smoke variants must run in tests on 8 simulated devices
        prepare(mod.get_config(",".join(a for a in (arg, "smoke") if a)), 8)


def test_train_cli_rejects_bad_config_before_building(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"),
           "--config=" + os.path.join(ROOT, "tests", "train_toy_config.py"), f"--workdir={tmp_path / 'w'}",
           "--config.train.batch_size=12"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "invalid config" in out.stderr and "'train.batch_size' = 12" in out.stderr
    assert not (tmp_path / "w").exists()  # nothing was built or written


def _train_cli(tmp_path, *args):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), f"--workdir={tmp_path / 'w'}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/vq_shapes.py:smoke", "--config.model.vq.gan_weight=0.5"], "'model.vq.gan_weight'"),
    (["--config=configs/vq_shapes.py:smoke", "--config.model.vq.target_mix=recon:1"], "'model.vq.target_mix'"),
    (["--config=configs/vq_shapes.py:smoke", "--config.optim.lr=nan"], "'optim.lr'"),
    (["--config=configs/base_shapes.py:smoke,vq=/nonexistent/vq_run"], "'init_from.path'"),
    (["--config=configs/base_shapes.py:smoke", "--config.data.max_seq_len=64"], "'data.max_seq_len' = 64"),
])
def test_train_cli_rejects_before_the_workdir_is_touched(tmp_path, args, message):
    out = _train_cli(tmp_path, *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "w").exists()  # no train.log, no empty checkpoints/


def test_train_cli_rejects_an_unknown_config_option_naming_the_closest(tmp_path):
    out = _train_cli(tmp_path, "--config=configs/vq_shapes.py:smok")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "did you mean 'smoke'" in out.stderr
    assert not (tmp_path / "w").exists()


def test_cli_override_of_a_field_a_config_derives_from(tmp_path):
    """`--config.train.batch_size=64` on base_shapes, through config_flags' real parsing: the step
    count is derived after the override, from the config's example budget."""
    code = ("import sys\nfrom absl import flags\nfrom ml_collections import config_flags\n"
            "from sgt_jax import checks\n"
            "cfg = config_flags.DEFINE_config_file('config', None, '', lock_config=True)\n"
            "flags.FLAGS(sys.argv)\nc = checks.prepare(cfg.value)\nprint(c.train.num_examples, c.train.steps)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
    path = os.path.join(ROOT, "configs", "base_shapes.py")
    outs = []
    for extra in ([], ["--config.train.batch_size=64"]):
        out = subprocess.run([sys.executable, "-c", code, f"--config={path}", *extra], env=env, capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(tuple(int(x) for x in out.stdout.split()))
    assert outs == [(142 * 32, 142), (142 * 32, 71)]  # same examples, half the steps



def test_a_tokenizer_larger_than_the_vocab_is_rejected_before_the_workdir(tmp_path):
    """The embedding table must cover the tokenizer: checked before anything is written."""
    import janus_fixture as jf

    tok = tmp_path / "tok"
    jf.make_tokenizer(tok)
    out = _train_cli(tmp_path, f"--config={os.path.join(ROOT, 'configs', 'umm_1b.py')}:smoke,tokenizer={tok}",
                     "--config.model.umm.llm.vocab_size=64")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "'model.umm.llm.vocab_size' = 64 is smaller than the tokenizer" in out.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("leaf", ["packing_bins", "packing_max_segments"])
def test_packing_sizes_must_be_positive(leaf):
    cfg = default_config()
    cfg.data.packing = True
    cfg.data[leaf] = 0
    msg = _err(cfg)
    assert f"'data.{leaf}'" in msg and "0" in msg and "> 0" in msg


def test_packing_is_for_the_umm_stage():
    cfg = default_config()
    cfg.stage, cfg.data.packing = "vq", True
    msg = _err(cfg)
    assert "'data.packing'" in msg and "'vq'" in msg and "umm" in msg


def test_pod_configs_pack_rows_by_option():
    for name in ("umm_1b.py", "umm_7b.py"):
        cfg = prepare(load_config(os.path.join(ROOT, "configs", f"{name}:pack=3,smoke")), 8)
        assert cfg.data.packing and cfg.data.packing_max_segments == 3
        assert not load_config(os.path.join(ROOT, "configs", f"{name}:smoke")).data.packing
    with pytest.raises(ConfigError, match="option 'pack' = -1"):
        load_config(os.path.join(ROOT, "configs", "umm_1b.py:pack=-1"))
