"""Tool-level faults: a bad or empty --workdir is named as such (exit 2), prompts are checked, not
cut, and a deleted data shard logs a few lines and a count rather than one per record."""
import logging
import os
import subprocess
import sys

import pytest
from xla_env import xla_flags

from sgt_jax.data import pipeline, records
from sgt_jax.data import sequences as seq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _tool(name, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
               PYTHONPATH=os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("tool", ["evaluate.py", "sample.py"])
def test_bad_and_empty_workdirs_are_named(tmp_path, tool):
    extra = ["--prompt=a red cube"] if tool == "sample.py" else []
    missing = _tool(tool, f"--workdir={tmp_path / 'nope'}", *extra)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert f"--workdir='{tmp_path / 'nope'}': directory does not exist" in missing.stderr
    assert "init_from" not in missing.stderr and "--config is required" not in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = _tool(tool, f"--workdir={tmp_path / 'empty'}", *extra)
    assert empty.returncode == 2, empty.stderr[-2000:]
    assert "there is no run there" in empty.stderr and "--config is required" not in empty.stderr


@pytest.mark.parametrize("tool,override,names", [
    ("train.py", "--config.optm.lr=1", ["'optm.lr'", "did you mean 'optim'?"]),
    ("train.py", "--config.optim.lr.x=1", ["'optim.lr.x'", "'optim.lr' is a value"]),
    ("evaluate.py", "--config.eval.umm.out_dir=x", ["'eval.umm.out_dir'", "fields of 'eval.umm'", "'mcq_items'"]),
])
def test_an_unknown_config_field_is_named_before_anything_is_written(tmp_path, tool, override, names):
    """A --config.x override of a field the config lacks: exit 2, one line naming the field, the
    value and what the section holds (ml_collections' own error is a traceback, exit 1)."""
    work = tmp_path / "run"
    args = ["--config=configs/vq_shapes.py:smoke"] if tool == "train.py" else []
    out = _tool(tool, *args, f"--workdir={work}", override)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "unknown config field" in out.stderr
    for name in names:
        assert name in out.stderr, out.stderr
    assert not work.exists()


def test_empty_prompt_is_rejected(tmp_path):
    from train_toy_stage import ToyStage, toy_config

    from sgt_jax.train.loop import train
    cfg = toy_config(tensorboard=False)
    cfg.train.steps = 1
    train(cfg, str(tmp_path), stage=ToyStage(cfg))  # any run with a checkpoint passes the workdir check
    out = _tool("sample.py", f"--workdir={tmp_path}", "--prompt=")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--prompt #1 is empty" in out.stderr and "rejected rather than sampled unconditionally" in out.stderr


def test_too_long_prompt_is_rejected_with_its_length_and_the_limit(caplog, load_tool):
    tool = load_tool("sample")
    layout = seq.Layout(max_seq_len=48, num_vit_tokens=4, vit_image_size=16, num_codes=9, image_size=24,
                        text_weight=1.0, gen_weight=1.0, cond_dropout=0.0)
    builder = seq.SequenceBuilder(layout, seq.SpecialIds(bos=1, eos=2, pad=0, img=3, img_end=4, boi=5, eoi=6),
                                  lambda s: [10 + i % 7 for i, _ in enumerate(s.split())])
    tool._check_prompt_lengths(builder, ["a red cube"])  # fits: no exit
    room = 48 - (len(builder.t2i_prefix([])) + 9 + 1)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as e:
        tool._check_prompt_lengths(builder, ["word " * 2000])
    assert e.value.code == 2
    assert f"is 2000 tokens (10000 characters) but this model takes at most {room} prompt tokens" in caplog.text


def test_a_deleted_shard_logs_a_few_lines_then_a_count(caplog):
    import grain
    stream = [records.Invalid(key=f"shard-3[{i}]", reason="undecodable: file not found") for i in range(2500)]
    ds = grain.MapDataset.source(stream + [{"x": 2501}]).to_iter_dataset()
    it = iter(pipeline._SkipInvalidIterDataset(ds, 10_000))
    with caplog.at_level(logging.WARNING):
        assert next(it) == {"x": 2501}
    lines = [r.getMessage() for r in caplog.records if "corrupt record" in r.getMessage()]
    assert len(lines) == 5 + 1 + 2  # five named, one "further skips are counted", then every 1000th
    assert lines[-1].startswith("skipped 2000 corrupt records so far")
    assert pipeline.skip_counts(it)["total"] == 2500
