"""--workdir=gs://...: every file a run writes goes through etils.epath. The test swaps GCS for an
in-memory fsspec filesystem (epath's fsspec backend, as on a host without TensorFlow), so a write
that bypasses epath (open / os.makedirs on "gs://...") lands on the local disk and fails the test."""
import json
import logging
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
from train_toy_stage import ToyStage, toy_config

from sgt_jax.train import loop

RUN = "gs://sgt-test-bucket/run"


class FakeGCS(MemoryFileSystem):
    """An fsspec filesystem under the gs/gcs protocols that keeps objects in a dict."""
    protocol = ("gcs", "gs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    import fsspec

    FakeGCS.store = {}
    FakeGCS.pseudo_dirs = [""]
    for proto in FakeGCS.protocol:
        fsspec.register_implementation(proto, FakeGCS, clobber=True)
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    # epath sends gs:// to TensorFlow's gfile when TF is importable; use its fsspec backend instead.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.chdir(tmp_path)  # a write that bypasses epath would create ./gs:/... here
    yield FakeGCS.store
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    assert not os.path.exists(tmp_path / "gs:"), "something wrote gs://... paths to the local disk"


def _objects(store, prefix):
    return {k[len(prefix) + 1:]: v.getvalue() for k, v in store.items() if k.startswith(prefix + "/")}


def test_smoke_run_writes_its_files_to_gs(fake_gcs, monkeypatch, tmp_path):
    from sgt_jax.eval import geneval_eval, report, umm_results
    from sgt_jax.train.stages import vq_eval

    # Checkpoints are Orbax's: it writes gs:// through tensorstore, which this fake cannot serve, so
    # they go to a local directory here (tests/test_train_checkpoint.py covers them).
    real_ckpt = loop.ckpt_lib.Checkpointer
    monkeypatch.setattr(loop.ckpt_lib, "Checkpointer",
                        lambda directory, **kw: real_ckpt(str(tmp_path / "ckpt"), **kw))
    cfg = toy_config(tensorboard=False)
    cfg.checkpoint.async_save = False
    before = list(logging.getLogger().handlers)
    try:
        assert loop.run(cfg, RUN, stage=ToyStage(cfg)) == 0
    finally:
        for h in logging.getLogger().handlers:
            if h not in before:
                h.close()
                logging.getLogger().removeHandler(h)
    files = _objects(fake_gcs, RUN)
    assert b"params:" in files["train.log"], sorted(files)
    rows = [json.loads(line) for line in files["metrics.jsonl"].decode().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8] and all(np.isfinite(r["train/loss"]) for r in train_rows)
    assert any("eval/mse" in r for r in rows)

    # Evaluation outputs: sample sheets, the VQ grid, the eval JSON, then the report over the run.
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    geneval_eval.save_grid(imgs, f"{RUN}/eval/geneval_test.png", columns=2)
    vq_eval.save_grid({"reconstruction": [np.stack(imgs[:2]), np.stack(imgs[2:])]}, f"{RUN}/eval/recon_grid.png")
    metrics = {"step": 8, "settings": {}, "splits": {"test": {"geneval": {"overall": 0.5,
                                                                           "samples": "geneval_test.png"}}}}
    assert umm_results.write_metrics(RUN, metrics) == f"{RUN}/eval/metrics.json"
    assert umm_results.read_metrics(RUN)["step"] == 8
    md = report.write_report({"run": RUN}, "gs://sgt-test-bucket/report/report.md")
    files = _objects(fake_gcs, "gs://sgt-test-bucket")
    for name in ("run/eval/geneval_test.png", "run/eval/recon_grid.png", "report/report_losses.png"):
        assert files[name][:8] == b"\x89PNG\r\n\x1a\n", name
    assert json.loads(files["run/eval/metrics.json"])["step"] == 8
    assert files["report/report.md"].decode().strip() == md.strip() and "report_losses.png" in md
    assert "run/eval/geneval_test.png" in md  # the sample sheet found on gs:// and linked


def test_tokenizer_cache_round_trips_through_gs(fake_gcs):
    from sgt_jax.config import default_config
    from sgt_jax.data import tokenizer

    cfg = default_config()
    tok = tokenizer.build_shapes_tokenizer("gs://sgt-test-bucket/data/tok", cfg, vocab_size=300, num_scenes=8)
    assert "gs://sgt-test-bucket/data/tok/tokenizer.json" in fake_gcs
    again = tokenizer.load_tokenizer("gs://sgt-test-bucket/data/tok")
    text = "a red circle"
    assert again.encode(text) == tok.encode(text)
