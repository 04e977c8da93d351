"""Where datasets live on disk, building them on demand, and opening their splits for reading.

`ensure_dataset(cfg)` is what entry points call before training: it builds the ArrayRecord files
and the tokenizer if they are missing (idempotent; building imports TensorFlow) and returns the
data dir. `open_source(cfg, split)` opens one split for the grain pipeline without TensorFlow.
"""
from __future__ import annotations

import os

from absl import logging

from sgt_jax.config import ConfigError
from sgt_jax.data import tokenizer
from sgt_jax.data.records import RecordSource

DATA_DIR_ENV = "SGT_DATA_DIR"
DEFAULT_DATA_DIR = "data_cache"


def data_dir_for(cfg, data_dir: str | None = None) -> str:
    """Explicit arg > cfg.data.data_dir > $SGT_DATA_DIR > ./data_cache, as an absolute path."""
    path = data_dir or cfg.data.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(path))


def tokenizer_dir_for(cfg, data_dir: str | None = None) -> str:
    """cfg.data.tokenizer_dir, else the Shapes World tokenizer saved next to the data."""
    if cfg.data.tokenizer_dir:
        return os.path.abspath(os.path.expanduser(cfg.data.tokenizer_dir))
    d = cfg.data
    return os.path.join(data_dir_for(cfg, data_dir), "tokenizers",
                        f"shapes_world_s{d.image_size}_o{d.min_objects}-{d.max_objects}"
                        f"_v{d.tokenizer_vocab_size}_c{d.tokenizer_corpus_scenes}")


DATASETS = ("shapes_world",)  # values of data.dataset that a builder exists for


def check_config(cfg) -> None:
    """Rules of the data source (listed in sgt_jax/checks.py): a dataset that can be built."""
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(f"config field 'data.dataset' = {cfg.data.dataset!r} is not allowed; "
                          f"allowed: {list(DATASETS)}")


def ensure_dataset(cfg, data_dir: str | None = None) -> str:
    """Build the dataset (all four splits) and its tokenizer if missing; return the data dir."""
    from sgt_jax.data import tfds_shapes_world  # TFDS: imported only when a dataset is opened

    root = data_dir_for(cfg, data_dir)
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), root)
    if b.is_prepared():
        logging.info("dataset %s already built in %s", b.info.full_name, b.data_dir)
    else:
        logging.info("building dataset %s in %s", b.info.full_name, b.data_dir)
        b.download_and_prepare()
    tok_dir = tokenizer_dir_for(cfg, root)
    if cfg.data.tokenizer_dir:
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            raise FileNotFoundError(f"config field 'data.tokenizer_dir' = {tok_dir!r} has no tokenizer.json")
    else:
        tokenizer.build_shapes_tokenizer(tok_dir, cfg, vocab_size=cfg.data.tokenizer_vocab_size,
                                         num_scenes=cfg.data.tokenizer_corpus_scenes)
    return root


def load_dataset_tokenizer(cfg, data_dir: str | None = None):
    """The tokenizer for this config (ours next to the data, or cfg.data.tokenizer_dir)."""

    return tokenizer.load_tokenizer(tokenizer_dir_for(cfg, data_dir))


def open_source(cfg, split: str, data_dir: str | None = None):
    """A `pipeline.RecordSource` over one split of the built dataset; never imports TensorFlow."""
    from sgt_jax.data import tfds_shapes_world  # TFDS: imported only when a dataset is opened
    root = data_dir_for(cfg, data_dir)
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), root)
    if not b.is_prepared():
        raise FileNotFoundError(
            f"dataset {b.info.full_name} is not built in {root}; run tools/build_dataset.py "
            f"--data_dir={root} (or sgt_jax.data.datasets.ensure_dataset(cfg))")
    return RecordSource.from_tfds(b.as_data_source(split), name=f"{b.name}/{split}")
