"""Metrics: TensorBoard event files + profile window from a real run, and the MFU arithmetic."""
import glob
import json
import os

import jax
import pytest
from train_toy_stage import ToyStage, toy_config

from sgt_jax.train import flops
from sgt_jax.train.loop import train


def test_throughput_and_mfu_arithmetic():
    tp = flops.throughput(steps=10, seconds=2.0, global_batch=32, flops_per_example=1e12, tokens_per_example=128,
                          num_devices=4, peak_tflops=100.0)
    assert tp["examples_per_sec"] == pytest.approx(160.0)
    assert tp["tokens_per_sec"] == pytest.approx(160.0 * 128)
    assert tp["tflops_per_device"] == pytest.approx(40.0)  # 160 ex/s * 1 TFLOP / 4 devices
    assert tp["mfu"] == pytest.approx(0.4)
    assert flops.throughput(steps=0, seconds=1.0, global_batch=1, flops_per_example=1, tokens_per_example=0,
                            num_devices=1, peak_tflops=1) == {}


def test_platform_peaks():
    class Dev:
        platform = "tpu"
        def __init__(self, kind):
            self.device_kind = kind
    assert flops.peak_tflops_per_device(0.0, Dev("TPU v5p")) == 459.0
    assert flops.peak_tflops_per_device(0.0, Dev("TPU v6 lite")) == 918.0
    assert flops.peak_tflops_per_device(0.0, Dev("NVIDIA H100 80GB HBM3")) == 989.0
    assert flops.peak_tflops_per_device(123.0, Dev("TPU v5p")) == 123.0  # configured wins
    cpu = flops.peak_tflops_per_device(0.0, jax.devices()[0])
    assert 1e-4 < cpu < 10.0  # a measured matmul peak shared by the simulated devices
    assert flops.peak_tflops_per_device(0.0, jax.devices()[0]) == cpu  # cached


def test_run_writes_tensorboard_and_profile(tmp_path):
    cfg = toy_config(tensorboard=True, steps=6, log_every=2, profile_start_step=2, profile_num_steps=2)
    res = train(cfg, str(tmp_path), stage=ToyStage(cfg))
    events = glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
    assert events, os.listdir(tmp_path)
    traces = glob.glob(os.path.join(tmp_path, "profile", "**", "*.xplane.pb"), recursive=True)
    assert traces, "jax.profiler trace missing"
    m = res.metrics
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/skipped", "perf/examples_per_sec",
                "perf/tflops_per_device", "perf/mfu", "perf/eta_minutes"):
        assert key in m, key
    assert m["perf/mfu"] > 0 and m["step"] == 6
    # Read the scalars back from the event file (TensorFlow is fine in this test).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.dirname(events[0]), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags().get("tensors", [])) | set(acc.Tags().get("scalars", []))
    assert {"train/loss", "perf/mfu", "eval/mse"} <= tags, tags
    # The same scalars as JSON lines, for reports that must not import TensorFlow.
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    assert any("eval/mse" in r for r in rows)


def test_training_core_imports_without_tensorflow():
    import subprocess
    import sys
    code = ("import sys\n"
            "import sgt_jax.train.loop, sgt_jax.train.step, sgt_jax.train.checkpoint, sgt_jax.train.metrics\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
            "assert 'clu.metric_writers' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
