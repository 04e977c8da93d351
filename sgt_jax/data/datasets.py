"""Where datasets live on disk, building them on demand, and opening their splits for reading.

`ensure_dataset(cfg)` is what entry points call before training: it builds the ArrayRecord files
and the tokenizer if they are missing (idempotent; building imports TensorFlow) and returns the
data dir. `open_source(cfg, split)` opens one split for the grain pipeline without TensorFlow.

Real datasets (`REAL_DATASETS`, builders in `tfds_real`) feed the tasks that `cfg.data.sources`
names (task -> dataset); they are built from `cfg.data.manual_dirs[dataset]` on first use, with
images stored at max(ViT size, VQ size). With any real source `open_source` returns one
`RecordSource` per mixture task, and a real run needs its own tokenizer (`data.tokenizer_dir`).
"""
from __future__ import annotations

import os

from absl import logging
from etils import epath

from sgt_jax.config import ConfigError
from sgt_jax.data import shapes_world, tokenizer
from sgt_jax.data.records import RecordSource

DATA_DIR_ENV = "SGT_DATA_DIR"
DEFAULT_DATA_DIR = "data_cache"


def data_dir_for(cfg, data_dir: str | None = None) -> str:
    """Explicit arg > cfg.data.data_dir > $SGT_DATA_DIR > ./data_cache, as an absolute path."""
    path = data_dir or cfg.data.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return _absolute(path)


def _absolute(path: str) -> str:
    """Local paths made absolute; URIs (gs://...) kept as they are (tfds and epath read them)."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def tokenizer_dir_for(cfg, data_dir: str | None = None) -> str:
    """cfg.data.tokenizer_dir, else the Shapes World tokenizer saved next to the data."""
    if cfg.data.tokenizer_dir:
        return _absolute(cfg.data.tokenizer_dir)
    d = cfg.data
    return os.path.join(data_dir_for(cfg, data_dir), "tokenizers",
                        f"shapes_world_s{d.image_size}_o{d.min_objects}-{d.max_objects}"
                        f"{shapes_world.world_suffix(str(d.get('world', 'full')))}"
                        f"_v{d.tokenizer_vocab_size}_c{d.tokenizer_corpus_scenes}")


# dataset -> (record kind, tasks it can feed)
REAL_DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sam_sgt": ("segmentation", ("proxy_segmentation", "proxy_reconstruction", "proxy_mae")),
    "coco_panoptic": ("segmentation", ("proxy_segmentation", "proxy_semantic", "proxy_reconstruction", "proxy_mae")),
    "llava_onevision": ("conversation", ("understanding",)),
}


def real_sources(cfg) -> dict[str, str]:
    """Mixture task -> real dataset, from `cfg.data.sources`; raises ValueError naming a bad entry."""
    sources = dict(cfg.data.get("sources", {}) or {})
    mixture = set(cfg.data.mixture.keys())
    for task, name in sources.items():
        if name not in REAL_DATASETS:
            raise ValueError(f"config field 'data.sources.{task}' = {name!r} is not allowed; "
                             f"allowed: {sorted(REAL_DATASETS)}")
        if task not in REAL_DATASETS[name][1]:
            raise ValueError(f"config field 'data.sources.{task}' = {name!r}: dataset {name} cannot feed task "
                             f"{task!r}; it feeds {list(REAL_DATASETS[name][1])}")
        if task not in mixture:
            raise ValueError(f"config field 'data.sources.{task}' names a task that is not in data.mixture "
                             f"({sorted(mixture)})")
    if sources and not cfg.data.tokenizer_dir:
        raise ValueError("config field 'data.tokenizer_dir' = '' is not allowed with real data.sources; "
                         "allowed: a local Hugging Face tokenizer directory (the Shapes World BPE only "
                         "knows Shapes World words)")
    return sources


DATASETS = ("shapes_world",)  # values of data.dataset that a builder exists for


def check_config(cfg) -> None:
    """Rules of the data sources (listed in sgt_jax/checks.py): a dataset that can be built, and
    `data.sources` naming known real datasets for tasks they can feed."""
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(f"config field 'data.dataset' = {cfg.data.dataset!r} is not allowed; "
                          f"allowed: {list(DATASETS)}")
    try:
        real_sources(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def real_image_size(cfg) -> int:
    """The stored side of real images: the larger of the ViT and VQ sizes (both resized from it)."""
    vit = int(cfg.model.umm.vit.image_size)
    return max(vit if vit > 0 else int(cfg.data.image_size), int(cfg.data.image_size))


def _real_builder(cfg, name: str, root: str):
    from sgt_jax.data import tfds_real

    return tfds_real.builder(name, real_image_size(cfg), root)


def _needs_shapes_world(cfg) -> bool:
    return any(t not in real_sources(cfg) for t in cfg.data.mixture.keys())


def ensure_dataset(cfg, data_dir: str | None = None) -> str:
    """Build the dataset (all four splits) and its tokenizer if missing; return the data dir.
    Real sources are built from their `data.manual_dirs` entry when not yet built."""
    root = data_dir_for(cfg, data_dir)
    sources = real_sources(cfg)
    for name in sorted(set(sources.values())):
        b = _real_builder(cfg, name, root)
        if not b.is_prepared():
            from sgt_jax.data import tfds_real

            manual = str(dict(cfg.data.get("manual_dirs", {}) or {}).get(name, ""))
            if not manual:
                raise FileNotFoundError(
                    f"dataset {b.info.full_name} is not built in {root} and config field "
                    f"'data.manual_dirs.{name}' is empty; set it to a local copy of the release or run "
                    f"tools/build_dataset.py --dataset={name} --manual_dir=DIR --data_dir={root}")
            tfds_real.prepare(name, real_image_size(cfg), root, os.path.expanduser(manual),
                              num_workers=max(1, int(cfg.data.num_workers)))
    if sources:
        tok_dir = tokenizer_dir_for(cfg, root)
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            raise FileNotFoundError(f"config field 'data.tokenizer_dir' = {tok_dir!r} has no tokenizer.json")
        if not _needs_shapes_world(cfg):
            return root
    from sgt_jax.data import tfds_shapes_world  # TFDS: imported only when a dataset is opened

    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), root)
    if b.is_prepared():
        logging.info("dataset %s already built in %s", b.info.full_name, b.data_dir)
    else:
        logging.info("building dataset %s in %s", b.info.full_name, b.data_dir)
        b.download_and_prepare()
    tok_dir = tokenizer_dir_for(cfg, root)
    if cfg.data.tokenizer_dir:
        if not epath.Path(tok_dir, "tokenizer.json").exists():
            raise FileNotFoundError(f"config field 'data.tokenizer_dir' = {tok_dir!r} has no tokenizer.json")
    else:
        tokenizer.build_shapes_tokenizer(tok_dir, cfg, vocab_size=cfg.data.tokenizer_vocab_size,
                                         num_scenes=cfg.data.tokenizer_corpus_scenes)
    return root


def load_dataset_tokenizer(cfg, data_dir: str | None = None):
    """The tokenizer for this config (ours next to the data, or cfg.data.tokenizer_dir)."""

    return tokenizer.load_tokenizer(tokenizer_dir_for(cfg, data_dir))


def open_real_source(cfg, name: str, task: str, split: str, data_dir: str | None = None):
    """A `RecordSource` over one split of a built real dataset, decoded for `task`; no TensorFlow."""
    from sgt_jax.data.real_records import RealDecoder

    root = data_dir_for(cfg, data_dir)
    b = _real_builder(cfg, name, root)
    if not b.is_prepared():
        raise FileNotFoundError(f"dataset {b.info.full_name} is not built in {root}; run tools/build_dataset.py "
                                f"--dataset={name} --manual_dir=DIR --data_dir={root}")
    if split not in b.info.splits:
        raise ValueError(f"dataset {name} has no split {split!r} (it has {sorted(b.info.splits)}); "
                         "for evaluation set eval.split to one of them or eval.num_examples = 0")
    ds = b.as_data_source(split)
    deserialize = ds.dataset_info.features.deserialize_example_np
    kind = REAL_DATASETS[name][0]
    decode = RealDecoder(deserialize, kind, proxy=task[len("proxy_"):] if task.startswith("proxy_") else None,
                         image_size=real_image_size(cfg))
    return RecordSource(raw=ds.data_source, deserialize=deserialize, name=f"{name}/{split}", decode=decode)


def open_source(cfg, split: str, data_dir: str | None = None):
    """A `pipeline.RecordSource` over one split of the built dataset; never imports TensorFlow.
    With real `data.sources`: a dict task -> RecordSource over every mixture task."""
    sources = real_sources(cfg)
    if sources:
        shared = open_source(_shapes_only(cfg), split, data_dir) if _needs_shapes_world(cfg) else None
        return {task: (open_real_source(cfg, sources[task], task, split, data_dir) if task in sources else shared)
                for task in cfg.data.mixture.keys()}
    from sgt_jax.data import tfds_shapes_world  # TFDS: imported only when a dataset is opened

    root = data_dir_for(cfg, data_dir)
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), root)
    if not b.is_prepared():
        raise FileNotFoundError(
            f"dataset {b.info.full_name} is not built in {root}; run tools/build_dataset.py "
            f"--data_dir={root} (or sgt_jax.data.datasets.ensure_dataset(cfg))")
    return RecordSource.from_tfds(b.as_data_source(split), name=f"{b.name}/{split}")


def _shapes_only(cfg):
    """A copy of cfg without real sources (opens the Shapes World split that other tasks share)."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        c.data.sources = {}
    return c
