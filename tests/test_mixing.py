"""data.mixing: "rows" mixes examples inside every batch; "batches" yields whole single-task batches
in the 2 : 1 cycle of the paper's OmniGen2 loader, and resumes the cycle exactly."""
import grain
import numpy as np
import pytest

from sgt_jax.checks import prepare as validate  # finalize + every rule
from sgt_jax.config import TASKS, default_config
from sgt_jax.data import pipeline, tfds_shapes_world
from sgt_jax.data.mixture import Mixture

SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mixing_data"))
    cfg = default_config()
    cfg.data.data_dir, cfg.data.image_size = root, SIZE
    cfg.data.train_size, cfg.data.validation_size, cfg.data.test_size, cfg.data.heldout_size = 16, 4, 4, 4
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), root)
    b.download_and_prepare()
    return cfg, pipeline.RecordSource.from_tfds(b.as_data_source("train"), "shapes_world/train")


def _example(record, rng):
    return {"seed": np.int64(record["seed"]), "noise": rng.integers(0, 2**31)}


def test_batch_pattern():
    assert pipeline.batch_pattern({"proxy_segmentation": 2.0, "understanding": 1.0}) == \
        ["proxy_segmentation", "proxy_segmentation", "understanding"]
    assert pipeline.batch_pattern({"proxy_depth": 1.5, "understanding": 1.0}) == ["proxy_depth"] * 3 + ["understanding"] * 2
    assert pipeline.batch_pattern({"proxy_depth": 0.0, "understanding": 1.0}) == ["understanding"]
    assert pipeline.batch_pattern({"a": 1.0, "b": 1.0}) == ["a", "b"]
    with pytest.raises(ValueError, match="data.mixture"):
        pipeline.batch_pattern({"a": 0.0})


def test_batches_mode_gives_whole_single_task_batches_in_2_to_1_cycle(setup):
    cfg, source = setup
    cfg = cfg.copy_and_resolve_references()
    cfg.data.mixture = {"proxy_segmentation": 2.0, "understanding": 1.0}
    cfg.data.mixing = "batches"
    transforms = Mixture.from_config(cfg, {"proxy_segmentation": _example, "understanding": _example})
    kw = dict(process_index=0, process_count=1, seed=0, batch_size=4, sources=source)
    ds = pipeline.make_dataset(cfg, "train", transforms, **kw)
    it = iter(ds)
    batches = [next(it) for _ in range(9)]
    seg, und = TASKS.index("proxy_segmentation"), TASKS.index("understanding")
    assert [int(b["task"][0]) for b in batches] == [seg, seg, und] * 3
    assert all(len(set(b["task"].tolist())) == 1 and b["task"].shape == (4,) for b in batches)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = iter(pipeline.make_dataset(cfg, "train", transforms, **kw))
    fresh.set_state(state)
    again = [next(fresh) for _ in range(4)]
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(expected, again, strict=True) for k in a)
    grain.experimental.assert_equal_output_after_checkpoint(grain.experimental.LimitIterDataset(ds, count=7))
    # rows mode (the default): every batch mixes the tasks
    cfg.data.mixing = "rows"
    transforms = Mixture.from_config(cfg, {"proxy_segmentation": _example, "understanding": _example})
    rows = iter(pipeline.make_dataset(cfg, "train", transforms, **kw))
    tasks = [set(next(rows)["task"].tolist()) for _ in range(6)]
    assert any(len(t) == 2 for t in tasks)


def test_mixing_choice_is_validated():
    c = default_config()
    c.data.mixing = "interleave"
    with pytest.raises(Exception, match="data.mixing"):
        validate(c)
