"""End to end on a converted tiny random Janus: convert both on-disk layouts with
tools/convert_checkpoint.py, then SGT-train `configs/umm_1b.py:smoke` from the conversion a few steps,
sample from the run and evaluate it, each through its command-line tool."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import janus_fixture as jf  # noqa: E402
from xla_env import xla_flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=400, ok=True):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_convert_both_layouts_then_train_sample_evaluate(tmp_path):
    jf.make_hf(tmp_path / "hf")
    jf.make_original(tmp_path / "hf", tmp_path / "orig", shards=2)
    manifests = {}
    for layout in ("hf", "orig"):
        out = tmp_path / f"conv_{layout}"
        _run(["tools/convert_checkpoint.py", f"--janus={tmp_path / layout}", f"--out={out}", "--dtype=f32"])
        manifests[layout] = json.loads((out / "manifest.json").read_text())
    assert manifests["hf"]["layout"] == "hf" and manifests["orig"]["layout"] == "original"
    for key in ("num_params", "overrides", "special_ids"):
        assert manifests["hf"][key] == manifests["orig"][key], key
    bad = _run(["tools/convert_checkpoint.py", f"--janus={tmp_path / 'missing'}", f"--out={tmp_path / 'x'}"], ok=False)
    assert bad.returncode == 2 and "--janus" in bad.stderr

    conv, work = tmp_path / "conv_orig", tmp_path / "run"
    config = f"--config=configs/umm_1b.py:smoke,init={conv},tokenizer={conv / 'tokenizer'}"
    # The converted checkpoint itself samples in Janus's conversation format (CFG, reference uncond row).
    _run(["tools/sample.py", f"--workdir={conv}", config, "--prompt_format=janus", "--prompt=a red circle",
          "--guidance_scale=3", "--temperature=0", f"--out_dir={tmp_path / 'janus_samples'}"])
    assert len(list((tmp_path / "janus_samples").glob("*.png"))) == 1
    data = f"--config.data.data_dir={tmp_path / 'data'}"
    _run(["tools/train.py", config, f"--workdir={work}", data, "--config.checkpoint.async_save=False"])
    assert (work / "checkpoints").exists()
    out = _run(["tools/sample.py", f"--workdir={work}", "--prompt=a red circle", "--temperature=0",
                f"--out_dir={tmp_path / 'samples'}"])
    assert list((tmp_path / "samples").glob("*.png")), out.stdout + out.stderr
    ev = _run(["tools/evaluate.py", f"--workdir={work}", f"--data_dir={tmp_path / 'data'}"], timeout=600)
    assert "{" in ev.stdout
    # ... and the converted checkpoint itself evaluates (config given, as it carries none).
    ev = _run(["tools/evaluate.py", f"--workdir={conv}", config, data], timeout=600)
    assert "{" in ev.stdout
