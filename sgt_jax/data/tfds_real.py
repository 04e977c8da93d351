"""TFDS builders for the real datasets: SAM-SGT, COCO panoptic, LLaVA-OneVision (ArrayRecord).

Each reads a local copy of the release from TFDS's `manual_dir` (layouts: `real_layouts`),
letterboxes every image to the config's stored side S (`real_images`), stores it as JPEG bytes,
and stores masks as uint8 id maps at S (nearest-neighbour, palette-ordered instances); the per-item
conversion is `real_examples` (optionally in worker processes). Reading back needs no TensorFlow:
`builder.as_data_source(split)` + `real_records.RealDecoder`.

Items that cannot become a training record are skipped at build time and counted with their key
(`builder.skipped`, written to `skipped.json` beside the dataset by `tools/build_dataset.py`):
  missing_file / undecodable   an image or mask is absent or does not decode
  no_instance                  the mask has no instance (after resizing, nothing left)
  empty_conversation           no question/answer turn with a non-empty answer
  no_image                     a LLaVA record without an image: skipped (every understanding row
                               here carries an image span; text-only rows are not laid out)
Building imports TensorFlow (TFDS's writer); this module imports TFDS only.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from sgt_jax.data import real_examples, real_layouts

VERSION = "1.0.0"
RELEASE_NOTES = {VERSION: "Letterboxed JPEG images, uint8 id maps, JSON conversation turns."}
WINDOW = 512  # items converted per round when building with worker processes


@dataclasses.dataclass(eq=False)
class RealConfig(tfds.core.BuilderConfig):
    """Stored image side S (the larger of the ViT and VQ sizes; both are resized from it)."""

    image_size: int = 384


def make_config(image_size: int = 384) -> RealConfig:
    return RealConfig(name=f"s{int(image_size)}", version=VERSION, release_notes=dict(RELEASE_NOTES),
                      image_size=int(image_size))


class _RealBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared parts: config, manual_dir handling, skip accounting."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = RELEASE_NOTES
    BUILDER_CONFIGS = [make_config()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Point --manual_dir at a local copy of the release (see real_layouts)."

    def __init__(self, *args, num_workers: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, list[dict]] = {}
        self.num_workers = int(num_workers)

    def _skip(self, split: str, key: str, reason: str) -> None:
        self.skipped.setdefault(split, []).append({"key": key, "reason": reason})
        logging.warning("%s/%s: skipping %s: %s", self.name, split, key, reason)

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """Per split, skipped items per category (+ total)."""
        out = {}
        for split, items in self.skipped.items():
            counts: dict[str, int] = {}
            for it in items:
                cat = it["reason"].split(":", 1)[0]
                counts[cat] = counts.get(cat, 0) + 1
            counts["total"] = len(items)
            out[split] = counts
        return out

    def _image_feature(self):
        return tfds.features.Tensor(shape=(), dtype=np.object_)

    def _map_feature(self):
        s = self.builder_config.image_size
        return tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)

    def _convert(self, split: str, items, fn):
        """Yield (tfds key, example) for `fn(key, item, size)` over items in order, skips counted;
        with `self.num_workers` > 1 in spawned processes, `WINDOW` items at a time (bounded memory)."""
        size = self.builder_config.image_size
        if self.num_workers <= 1:
            results = (fn(key, item, size) for key, item in items)
        else:
            results = self._parallel(items, functools.partial(_apply, fn, size))
        for status, key, value in results:
            if status == "ok":
                yield key, value
            else:
                self._skip(split, key, value)

    def _parallel(self, items, fn):
        import itertools
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(self.num_workers) as pool:
            it = iter(items)
            while window := list(itertools.islice(it, WINDOW)):
                yield from pool.map(fn, window, chunksize=max(1, WINDOW // (4 * self.num_workers)))


def _apply(fn, size, key_item):
    return fn(key_item[0], key_item[1], size)


class SamSgt(_RealBuilder):
    """SAM-SGT segmentation pairs: an image and its RGB instance mask (one flat colour per instance)."""

    def _info(self):
        return self.dataset_info_from_configs(
            description="SAM-SGT image / instance-mask pairs, instances coloured by our fixed palette.",
            features=tfds.features.FeaturesDict({
                "key": tfds.features.Text(), "image": self._image_feature(), "instance": self._map_feature(),
                "num_instances": np.int32, "dropped_instances": np.int32, "source_size": tfds.features.Tensor(
                    shape=(2,), dtype=np.int32)}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, root: str):
        yield from self._convert("train", real_layouts.iter_sam_sgt(root), real_examples.sam_example)


class CocoPanoptic(_RealBuilder):
    """COCO panoptic: thing instances (by area) on our palette, stuff and void background; class map
    over all 133 categories (index in id order + 1; 0 = void) for the semantic proxy. Crowd
    segments are not instances (background) but keep their class."""

    def _info(self):
        return self.dataset_info_from_configs(
            description="COCO panoptic 2017: instance ids (things) and class ids (things + stuff).",
            features=tfds.features.FeaturesDict({
                "key": tfds.features.Text(), "image": self._image_feature(), "instance": self._map_feature(),
                "semantic": self._map_feature(), "num_instances": np.int32, "dropped_instances": np.int32,
                "source_size": tfds.features.Tensor(shape=(2,), dtype=np.int32)}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        return {split: self._generate_examples(root, split) for split in real_layouts.coco_splits(root)}

    def _generate_examples(self, root: str, split: str):
        categories = real_layouts.coco_categories(root, split)
        fn = functools.partial(real_examples.coco_example,
                               class_index={int(c["id"]): i + 1 for i, c in enumerate(categories)},
                               is_thing={int(c["id"]): bool(c.get("isthing", 1)) for c in categories})
        yield from self._convert(split, real_layouts.iter_coco_panoptic(root, split), fn)


class LlavaOnevision(_RealBuilder):
    """LLaVA-OneVision VQA: image + multi-turn conversation (as [[question, answer], ...])."""

    def _info(self):
        return self.dataset_info_from_configs(
            description="LLaVA-OneVision-Data conversations with their image (records without one skipped).",
            features=tfds.features.FeaturesDict({
                "key": tfds.features.Text(), "image": self._image_feature(), "turns": tfds.features.Text(),
                "data_source": tfds.features.Text(), "source_size": tfds.features.Tensor(shape=(2,), dtype=np.int32)}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, root: str):
        yield from self._convert("train", real_layouts.iter_llava_onevision(root), real_examples.llava_example)


BUILDERS: dict[str, type[_RealBuilder]] = {"sam_sgt": SamSgt, "coco_panoptic": CocoPanoptic,
                                           "llava_onevision": LlavaOnevision}


def builder(name: str, image_size: int, data_dir: str, num_workers: int = 1) -> _RealBuilder:
    """The builder of dataset `name` storing images at `image_size`, under `data_dir` (ArrayRecord);
    `num_workers` > 1 converts items in that many processes when building."""
    if name not in BUILDERS:
        raise ValueError(f"unknown real dataset {name!r}; allowed: {sorted(BUILDERS)}")
    config = make_config(image_size)
    cls = BUILDERS[name]
    if config.name in {c.name for c in cls.BUILDER_CONFIGS}:
        config = config.name
    return cls(config=config, data_dir=data_dir, file_format="array_record", num_workers=num_workers)


def prepare(name: str, image_size: int, data_dir: str, manual_dir: str, num_workers: int = 1) -> _RealBuilder:
    """Build (if not yet built) from the local copy in `manual_dir`; writes skipped.json beside the
    dataset and logs the skip counts. Returns the builder."""
    import os

    if not manual_dir or not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"manual_dir {manual_dir!r} for dataset {name!r} is not a directory; "
                                "it must hold a local copy of the release")
    b = builder(name, image_size, data_dir, num_workers)
    if b.is_prepared():
        logging.info("dataset %s already built in %s", b.info.full_name, b.data_dir)
        return b
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    report = {"skip_counts": b.skip_counts(), "skipped": b.skipped}
    with open(os.path.join(b.data_dir, "skipped.json"), "w") as f:
        json.dump(report, f, indent=1)
    logging.info("built %s in %s; skipped: %s", b.info.full_name, b.data_dir, report["skip_counts"] or "none")
    return b
