"""TFDS Shapes World builder: ArrayRecord on disk, read back exactly and without TensorFlow."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sgt_jax.config import default_config
from sgt_jax.data import tfds_shapes_world

SIZES = {"train": 12, "validation": 4, "test": 4, "heldout": 4}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(root):
    cfg = default_config()
    cfg.data.data_dir = root
    cfg.data.image_size = 32
    for split, n in SIZES.items():
        cfg.data[f"{split}_size"] = n
    return cfg


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds_data"))
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(_cfg(root)), root)
    b.download_and_prepare()
    return root


def test_builder_writes_array_record_splits(built):
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(_cfg(built)), built)
    assert b.is_prepared()
    assert {k: v.num_examples for k, v in b.info.splits.items()} == SIZES
    files = os.listdir(b.data_dir)
    assert any(".array_record-" in f for f in files), files
    assert str(b.info.file_format.value) == "array_record"


_READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from sgt_jax.config import default_config
    from sgt_jax.data import records, shapes_world, tfds_shapes_world
    from sgt_jax.data import pipeline

    root = sys.argv[1]
    cfg = default_config()
    cfg.data.data_dir, cfg.data.image_size = root, 32
    sizes = json.loads(sys.argv[2])
    for split, n in sizes.items():
        cfg.data[split + "_size"] = n
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), root)
    world = shapes_world.WorldConfig(image_size=32)
    out = {"splits": {}, "mismatch": [], "invalid": []}
    for split in sizes:
        src = b.as_data_source(split)
        keys = []
        for i in range(len(src)):
            rec = records.parse_record(src[i])
            reason = records.validate_record(rec, image_size=32)
            if reason:
                out["invalid"].append((rec["key"], reason))
            keys.append(rec["key"])
            scene = shapes_world.generate_scene(rec["seed"], world, split)
            for name in ("image", "instance", "semantic", "depth", "edges"):
                if rec[name].dtype != np.uint8 or not np.array_equal(rec[name], scene[name]):
                    out["mismatch"].append((rec["key"], name))
            if json.loads(json.dumps(scene["objects"])) != rec["objects"]:
                out["mismatch"].append((rec["key"], "objects"))
            if rec["background"] != scene["background"] or rec["split"] != split:
                out["mismatch"].append((rec["key"], "text"))
        out["splits"][split] = keys
    # The grain path too, with jax's default process index.
    it = pipeline.make_iterator(cfg, "train", lambda r, rng: {"image": r["image"]}, batch_size=4)
    out["batch"] = list(next(it)["image"].shape)
    out["tf_loaded"] = "tensorflow" in sys.modules
    print("RESULT" + json.dumps(out))
""")


def test_read_back_exact_without_tensorflow(built):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _READER, built, json.dumps(SIZES)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["tf_loaded"] is False
    assert out["invalid"] == [] and out["mismatch"] == []
    for split, n in SIZES.items():
        keys = out["splits"][split]
        assert keys == sorted(keys) and len(set(keys)) == n  # record i = seed i
        assert keys[0] == f"{split}-0000000"
    assert out["batch"] == [4, 32, 32, 3]


def test_heldout_records_contain_heldout_pairs(built):
    from sgt_jax.data import records, shapes_world

    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(_cfg(built)), built)
    src = b.as_data_source("heldout")
    held = {tuple(p) for p in shapes_world.HELDOUT_PAIRS}
    for i in range(len(src)):
        objs = records.parse_record(src[i])["objects"]
        assert any((o["color"], o["shape"]) in held for o in objs)


def test_config_names_separate_variants():
    a = tfds_shapes_world.make_config(image_size=32, train_size=8)
    b = tfds_shapes_world.make_config(image_size=64, train_size=8)
    c = tfds_shapes_world.config_from(default_config())
    assert len({a.name, b.name, c.name}) == 3
    assert c.split_sizes()["train"] == default_config().data.train_size


def test_build_tool_then_ensure_dataset_is_a_no_op(tmp_path):
    from sgt_jax.data import datasets, tokenizer

    root = str(tmp_path / "data")
    sizes = {"train": 6, "validation": 2, "test": 2, "heldout": 2}
    args = [f"--{split}_size={n}" for split, n in sizes.items()]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_dataset.py"), "--dataset=shapes_world",
                           f"--data_dir={root}", "--image_size=32", "--tokenizer_corpus_scenes=40",
                           "--tokenizer_vocab_size=400", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"splits: {sizes}" in proc.stdout

    cfg = _cfg(root)
    for split, n in sizes.items():
        cfg.data[f"{split}_size"] = n
    cfg.data.tokenizer_corpus_scenes, cfg.data.tokenizer_vocab_size = 40, 400
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), root)
    info = os.path.join(b.data_dir, "dataset_info.json")
    tok_json = os.path.join(datasets.tokenizer_dir_for(cfg), "tokenizer.json")
    stamps = (os.path.getmtime(info), os.path.getmtime(tok_json))
    assert datasets.ensure_dataset(cfg) == root
    assert (os.path.getmtime(info), os.path.getmtime(tok_json)) == stamps  # nothing rebuilt
    tok = datasets.load_dataset_tokenizer(cfg)
    assert set(tokenizer.special_token_ids(tok)) >= {"bos", "img", "boi"}
    assert len(datasets.open_source(cfg, "train")) == sizes["train"]
    cfg.data.train_size = 7  # a variant that was never built
    with pytest.raises(FileNotFoundError, match="build_dataset.py"):
        datasets.open_source(cfg, "train")
