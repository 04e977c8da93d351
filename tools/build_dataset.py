"""Build a dataset's ArrayRecord files (TFDS) and its tokenizer.

  python tools/build_dataset.py --dataset=shapes_world --data_dir=data_cache \
      --train_size=4096 --validation_size=256 --test_size=256 --heldout_size=256 --image_size=64

  python tools/build_dataset.py --dataset=sam_sgt --manual_dir=/data/sgt_release --data_dir=data_cache --num_workers=16
  python tools/build_dataset.py --dataset=coco_panoptic --manual_dir=/data/coco --store_size=384
  python tools/build_dataset.py --dataset=llava_onevision --manual_dir=/data/LLaVA-OneVision-Data

Real datasets read a local copy of the release from --manual_dir (layouts: sgt_jax/data/real_layouts.py)
and store images at --store_size (the larger of the ViT and VQ sizes of the config that reads them:
384 for umm_1b). Items that cannot be used are skipped and listed with their key in skipped.json
beside the dataset.

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
REAL = ("sam_sgt", "coco_panoptic", "llava_onevision")
flags.DEFINE_enum("dataset", "shapes_world", ["shapes_world", *REAL], "Which dataset to build.")
flags.DEFINE_string("manual_dir", None, "Real datasets: local copy of the release.")
flags.DEFINE_integer("store_size", 384, "Real datasets: stored image side (max of the ViT and VQ sizes).")
flags.DEFINE_integer("num_workers", 1, "Real datasets: processes that decode / resize / encode items.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $SGT_DATA_DIR or ./data_cache).")
flags.DEFINE_integer("image_size", _DEFAULTS.image_size, "Image side in pixels (multiple of 16).")
flags.DEFINE_integer("min_objects", _DEFAULTS.min_objects, "Fewest objects per scene.")
flags.DEFINE_integer("max_objects", _DEFAULTS.max_objects, "Most objects per scene.")
flags.DEFINE_enum("world", _DEFAULTS.world, list(config_lib.WORLDS), "What scenes contain (data.world preset).")
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
    for name in ("image_size", "min_objects", "max_objects", "world", "train_size", "validation_size", "test_size",
                 "heldout_size", "tokenizer_vocab_size", "tokenizer_corpus_scenes"):
        cfg.data[name] = getattr(FLAGS, name)
    return checks.prepare(cfg)


def build_real() -> int:
    import json
    import os

    from sgt_jax.data import datasets, tfds_real

    if not FLAGS.manual_dir or not os.path.isdir(FLAGS.manual_dir):
        logging.error("--manual_dir=%r is not a directory; --dataset=%s needs a local copy of its release",
                      FLAGS.manual_dir, FLAGS.dataset)
        return 2
    if FLAGS.store_size < 16 or FLAGS.store_size % 16:
        logging.error("--store_size=%d is not allowed; allowed: a multiple of 16, >= 16", FLAGS.store_size)
        return 2
    data_dir = datasets.data_dir_for(config_lib.default_config(), FLAGS.data_dir)
    start = time.time()
    try:
        b = tfds_real.prepare(FLAGS.dataset, FLAGS.store_size, data_dir, FLAGS.manual_dir,
                              num_workers=max(1, FLAGS.num_workers))
    except FileNotFoundError as e:
        logging.error("%s", e)
        return 2
    logging.info("done in %.1fs", time.time() - start)
    print(f"dataset: {b.data_dir}")
    print(f"splits: { {name: split.num_examples for name, split in b.info.splits.items()} }")
    skipped = os.path.join(b.data_dir, "skipped.json")
    if os.path.exists(skipped):
        with open(skipped) as f:
            print(f"skipped: {json.load(f)['skip_counts'] or 'none'} (keys in {skipped})")
    return 0


def main(argv):
    del argv
    if FLAGS.dataset in REAL:
        return build_real()
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
    import sys

    app.run(lambda argv: sys.exit(main(argv)))
