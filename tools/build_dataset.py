"""Build a dataset's ArrayRecord files (TFDS) and its tokenizer.

  python tools/build_dataset.py --dataset=shapes_world --data_dir=data_cache \
      --train_size=4096 --validation_size=256 --test_size=256 --heldout_size=256 --image_size=64

Idempotent: an already built variant is left alone. Training entry points call the same library
function (`sgt_jax.data.datasets.ensure_dataset`) so this step is optional.
"""
from __future__ import annotations

import time

from absl import app, flags, logging

from sgt_jax import checks
from sgt_jax import config as config_lib

_DEFAULTS = config_lib.default_config().data

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "shapes_world", ["shapes_world"], "Which dataset to build.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $SGT_DATA_DIR or ./data_cache).")
flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Image side in pixels (multiple of 16).")
flags.DEFINE_integer("min_objects", _DEFAULTS.min_objects, "Fewest objects per scene.")
flags.DEFINE_integer("max_objects", _DEFAULTS.max_objects, "Most objects per scene.")
flags.DEFINE_integer("train_size", _DEFAULTS.train_size, "Scenes in the train split.")
flags.DEFINE_integer("validation_size", _DEFAULTS.validation_size, "Scenes in the validation split.")
flags.DEFINE_integer("test_size", _DEFAULTS.test_size, "Scenes in the test split.")
flags.DEFINE_integer("heldout_size", _DEFAULTS.heldout_size, "Scenes in the held-out compositional split.")
flags.DEFINE_integer("tokenizer_vocab_size", _DEFAULTS.tokenizer_vocab_size, "Shapes World BPE vocabulary size.")
flags.DEFINE_integer("tokenizer_corpus_scenes", _DEFAULTS.tokenizer_corpus_scenes,
                     "Train scenes whose texts train the tokenizer.")


def config_from_flags():
    cfg = config_lib.default_config()
    cfg.data.dataset = FLAGS.dataset
    if FLAGS.data_dir:
        cfg.data.data_dir = FLAGS.data_dir
    for name in ("image_size", "min_objects", "max_objects", "train_size", "validation_size", "test_size",
                 "heldout_size", "tokenizer_vocab_size", "tokenizer_corpus_scenes"):
        cfg.data[name] = getattr(FLAGS, name)
    return checks.prepare(cfg)


def main(argv):
    del argv
    from sgt_jax.data import datasets, tfds_shapes_world

    cfg = config_from_flags()
    start = time.time()
    data_dir = datasets.ensure_dataset(cfg)
    b = tfds_shapes_world.builder(tfds_shapes_world.config_from(cfg), data_dir)
    sizes = {name: split.num_examples for name, split in b.info.splits.items()}
    logging.info("done in %.1fs", time.time() - start)
    print(f"dataset: {b.data_dir}")
    print(f"splits: {sizes}")
    print(f"tokenizer: {datasets.tokenizer_dir_for(cfg, data_dir)}")


if __name__ == "__main__":
    app.run(main)
