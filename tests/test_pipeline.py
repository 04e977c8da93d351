"""grain pipeline: determinism, per-process slices, mixture weights, exact resume, corrupt records."""
import logging as pylogging

import grain
import numpy as np
import pytest

from sgt_jax.config import TASKS, default_config
from sgt_jax.data import pipeline, tfds_shapes_world
from sgt_jax.data.mixture import Mixture

NUM_TRAIN = 24
SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline_data"))
    cfg = _cfg(root)
    tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), root).download_and_prepare()
    return root


def _cfg(root):
    cfg = default_config()
    cfg.data.data_dir = root
    cfg.data.image_size = SIZE
    cfg.data.train_size, cfg.data.validation_size, cfg.data.test_size, cfg.data.heldout_size = NUM_TRAIN, 4, 4, 4
    return cfg


@pytest.fixture(scope="module")
def source(data_dir):
    cfg = _cfg(data_dir)
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), data_dir)
    return pipeline.RecordSource.from_tfds(b.as_data_source("train"), "shapes_world/train")


def to_example(record, rng):
    """A stand-in stage transform: keeps what identifies the record plus one rng draw."""
    return {"image": record["image"], "seed": np.int64(record["seed"]),
            "num_objects": np.int32(len(record["objects"])), "noise": rng.integers(0, 2**31)}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_have_static_shapes_and_are_deterministic(data_dir, source):
    cfg = _cfg(data_dir)
    kw = dict(process_index=0, process_count=1, batch_size=5, sources=source)
    first = _take(pipeline.make_iterator(cfg, "train", to_example, seed=3, **kw), 8)
    again = _take(pipeline.make_iterator(cfg, "train", to_example, seed=3, **kw), 8)
    other = _take(pipeline.make_iterator(cfg, "train", to_example, seed=4, **kw), 8)
    for b in first:
        assert b["image"].shape == (5, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
        assert b["seed"].shape == (5,)
    assert all(_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a["seed"], b["seed"]) for a, b in zip(first, other, strict=True))
    # Training repeats: 8 batches of 5 > 24 records, every record is seen and each epoch is a permutation.
    seeds = np.concatenate([b["seed"] for b in first])
    assert sorted(seeds[:NUM_TRAIN]) == list(range(NUM_TRAIN))
    # The per-example rng differs between examples (not one shared draw).
    assert len(set(np.concatenate([b["noise"] for b in first]).tolist())) > 30


def test_eval_is_one_ordered_pass_without_remainder(data_dir):
    cfg = _cfg(data_dir)  # no `sources`: opens the built split from cfg.data.data_dir
    batches = list(pipeline.make_iterator(cfg, "validation", to_example, process_index=0, process_count=1,
                                          batch_size=3))
    assert len(batches) == 1 and batches[0]["seed"].tolist() == sorted(batches[0]["seed"].tolist())


def test_process_slices_are_disjoint_and_cover(data_dir, source):
    cfg = _cfg(data_dir)
    seen = []
    for p in range(3):
        it = pipeline.make_iterator(cfg, "train", to_example, process_index=p, process_count=3, seed=0, batch_size=1,
                                    training=False, sources=source)
        seen.append({int(b["seed"][0]) for b in it})
    assert sum(len(s) for s in seen) == NUM_TRAIN
    assert set().union(*seen) == set(range(NUM_TRAIN))
    # Training mode shuffles within the same slices: one epoch of process 1 is exactly its slice.
    it = pipeline.make_iterator(cfg, "train", to_example, process_index=1, process_count=3, seed=0, batch_size=1,
                                sources=source)
    assert {int(next(it)["seed"][0]) for _ in range(NUM_TRAIN // 3)} == seen[1]


def test_mixture_follows_weights_with_task_transforms(data_dir, source):
    cfg = _cfg(data_dir)
    cfg.data.mixture = {"understanding": 3.0, "proxy_segmentation": 1.0}

    def flipped(record, rng):
        out = to_example(record, rng)
        out["image"] = record["image"][:, ::-1]
        return out

    transforms = {"understanding": to_example, "proxy_segmentation": flipped, "t2i": to_example}  # t2i: not mixed
    mixture = Mixture.from_config(cfg, transforms)
    assert mixture.tasks == ("proxy_segmentation", "understanding") and mixture.weights == (1.0, 3.0)
    assert mixture.ids == (TASKS.index("proxy_segmentation"), TASKS.index("understanding"))
    it = pipeline.make_iterator(cfg, "train", mixture,
                                process_index=0, process_count=1, seed=0, batch_size=8, sources=source)
    batches = _take(it, 25)
    tasks = np.concatenate([b["task"] for b in batches])
    share = np.mean(tasks == TASKS.index("understanding"))
    assert set(tasks.tolist()) == {TASKS.index("understanding"), TASKS.index("proxy_segmentation")}
    assert abs(share - 0.75) < 0.05, share
    with pytest.raises(ValueError, match="data.mixture"):
        Mixture.from_config(cfg, {"understanding": to_example})


def test_state_restores_exactly_the_same_next_batches(data_dir, source):
    cfg = _cfg(data_dir)
    cfg.data.mixture = {"understanding": 2.0, "t2i": 1.0}
    kw = dict(process_index=0, process_count=1, seed=7, batch_size=4,
              sources=_CorruptSource.wrap(source, {5: "truncate", 11: "empty"}))
    transforms = Mixture.from_config(cfg, {"understanding": to_example, "t2i": to_example})
    ds = pipeline.make_dataset(cfg, "train", transforms, **kw)
    grain.experimental.assert_equal_output_after_checkpoint(grain.experimental.LimitIterDataset(ds, count=10))

    it = iter(ds)
    _take(it, 7)  # past one epoch, so skips have happened
    state = it.get_state()
    expected = _take(it, 4)
    fresh = pipeline.make_iterator(cfg, "train", transforms, **kw)
    fresh.set_state(state)
    assert pipeline.skip_counts(fresh) == pipeline.skip_counts(state) and pipeline.skip_counts(state)["total"] > 0
    assert all(_equal(a, b) for a, b in zip(expected, _take(fresh, 4), strict=True))


def test_orbax_checkpoint_of_the_iterator(tmp_path, data_dir, source):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = _cfg(data_dir)
    kw = dict(process_index=0, process_count=1, seed=1, batch_size=4, sources=source)
    it = pipeline.make_iterator(cfg, "train", to_example, **kw)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 3)
    fresh = pipeline.make_iterator(cfg, "train", to_example, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert all(_equal(a, b) for a, b in zip(expected, _take(fresh, 3), strict=True))


class _CorruptSource:
    """Corrupts chosen records of a real source, at the byte level or after decoding."""

    def __init__(self, source, plan):
        self.source, self.plan = source, plan

    @classmethod
    def wrap(cls, source, plan):
        c = cls(source, plan)
        return pipeline.RecordSource(raw=c, deserialize=c.deserialize, name=source.name)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        raw = self.source.raw[i]
        how = self.plan.get(i)
        if how == "truncate":
            return raw[: len(raw) // 2]
        if how == "bad_image_bytes":
            from tensorflow_datasets.proto import tf_example_pb2

            ex = tf_example_pb2.Example.FromString(raw)
            ex.features.feature["image"].bytes_list.value[0] = b"\x89PNG\r\n\x1a\nnot really an image"
            return ex.SerializeToString()
        if how is not None:  # decoded-level corruption, keyed by a tag in the bytes
            return how.encode() + b"|" + raw
        return raw

    def deserialize(self, raw):
        tag = None
        if b"|" in raw[:20] and raw.split(b"|", 1)[0] in (b"empty", b"mask_shape", b"mismatch", b"dtype"):
            tag, raw = raw.split(b"|", 1)
        rec = dict(self.source.deserialize(raw))
        if tag == b"empty":
            rec["objects"] = b"[]"
        elif tag == b"mask_shape":
            rec["instance"] = rec["instance"][: SIZE // 2]
        elif tag == b"mismatch":
            rec["semantic"] = np.zeros_like(rec["semantic"])
        elif tag == b"dtype":
            rec["image"] = rec["image"].astype(np.float32)
        return rec


def test_corrupt_records_are_skipped_counted_and_logged(data_dir, source, caplog):
    cfg = _cfg(data_dir)
    plan = {1: "truncate", 4: "bad_image_bytes", 6: "empty", 9: "mask_shape", 13: "mismatch", 17: "dtype"}
    bad = _CorruptSource.wrap(source, plan)
    bad_seeds = {int(source.deserialize(source.raw[i])["seed"]) for i in plan}
    with caplog.at_level(pylogging.WARNING):
        it = pipeline.make_iterator(cfg, "train", to_example, process_index=0, process_count=1, batch_size=2,
                                    training=False, sources=bad)
        seeds = np.concatenate([b["seed"] for b in it]).tolist()
    assert len(seeds) == NUM_TRAIN - len(plan)
    assert not bad_seeds & set(seeds)
    counts = pipeline.skip_counts(it)
    assert counts["total"] == len(plan)
    assert counts["undecodable"] == 2 and counts["empty_objects"] == 1 and counts["bad_shape"] == 1
    assert counts["inconsistent_maps"] == 1 and counts["bad_dtype"] == 1
    logged = caplog.text
    assert "skipping corrupt record" in logged
    assert "shapes_world/train[1]" in logged  # undecodable: named by position
    assert "train-" in logged  # decodable but invalid: named by its own key

    # Training keeps going across epochs and never yields a corrupt one.
    it = pipeline.make_iterator(cfg, "train", to_example, process_index=0, process_count=1, batch_size=4, seed=2,
                                sources=bad)
    seeds = np.concatenate([b["seed"] for b in _take(it, 12)]).tolist()
    assert not bad_seeds & set(seeds)
    assert pipeline.skip_counts(it)["total"] >= 2 * len(plan)


def test_a_dataset_of_only_bad_records_fails_loudly(data_dir, source):
    cfg = _cfg(data_dir)
    bad = _CorruptSource.wrap(source, {i: "truncate" for i in range(NUM_TRAIN)})
    it = pipeline.make_iterator(cfg, "train", to_example, process_index=0, process_count=1, batch_size=2,
                                sources=bad, max_consecutive_skips=50)
    with pytest.raises(RuntimeError, match="in a row were invalid"):
        next(it)
