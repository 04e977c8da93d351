"""TFDS builder that writes Shapes World scenes to ArrayRecord.

Images and maps are stored as raw uint8 tensors (`Encoding.BYTES`), not PNG: ArrayRecord already
compresses its chunks, so the files are about as small, and decoding is a plain `np.frombuffer`
(no PIL/OpenCV, no TensorFlow) which is ~4x faster than PNG when read through
`builder.as_data_source(split)`. The object list is JSON text so it can grow fields freely; scene-level strings (split,
background) are Text features.

Building needs TensorFlow (TFDS's writer); reading does not. This module imports TFDS only,
which loads TensorFlow lazily.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds

from sgt_jax.data import shapes_world

SPLITS = ("train", "validation", "test", "heldout")
TEXT_FIELDS = ("split", "background", "background_texture")  # scene-level strings kept for captions
VERSION = "1.0.0"
RELEASE_NOTES = {VERSION: "Raw uint8 image and maps, JSON object list, scene text fields."}


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """World parameters and split sizes; the name encodes them so each variant gets its own dir."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    world: str = "full"  # shapes_world.WORLD_PRESETS
    train_size: int = 4096
    validation_size: int = 256
    test_size: int = 256
    heldout_size: int = 256

    def split_sizes(self) -> dict[str, int]:
        return {s: getattr(self, f"{s}_size") for s in SPLITS}


def make_config(*, image_size: int = 64, min_objects: int = 1, max_objects: int = 4, train_size: int = 4096,
                validation_size: int = 256, test_size: int = 256, heldout_size: int = 256,
                world: str = "full") -> ShapesWorldConfig:
    """A `ShapesWorldConfig` whose name is derived from its values (stable directory per variant)."""
    name = (f"s{image_size}_o{min_objects}-{max_objects}{shapes_world.world_suffix(world)}"
            f"_n{train_size}-{validation_size}-{test_size}-{heldout_size}")
    return ShapesWorldConfig(name=name, version=VERSION, release_notes=dict(RELEASE_NOTES), image_size=image_size, min_objects=min_objects,
                             max_objects=max_objects, world=world, train_size=train_size, validation_size=validation_size,
                             test_size=test_size, heldout_size=heldout_size)


def config_from(cfg) -> ShapesWorldConfig:
    """The builder config for an experiment ConfigDict (fields under cfg.data)."""
    d = cfg.data
    return make_config(image_size=d.image_size, min_objects=d.min_objects, max_objects=d.max_objects,
                       train_size=d.train_size, validation_size=d.validation_size, test_size=d.test_size,
                       heldout_size=d.heldout_size, world=str(d.get("world", "full")))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__} in a Shapes World object list")


def scene_to_example(key: str, seed: int, scene: dict) -> dict:
    """The stored form of one `shapes_world.generate_scene` output."""
    example = {"key": key, "seed": seed, "objects": json.dumps(scene["objects"], default=_json_default)}
    for name in TEXT_FIELDS:
        example[name] = str(scene.get(name, ""))
    for name in ("image", "instance", "semantic", "depth", "edges"):
        example[name] = np.asarray(scene[name], dtype=np.uint8)
    return example


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """Procedural Shapes World scenes with exact ground truth (see sgt_jax.data.shapes_world)."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = RELEASE_NOTES
    BUILDER_CONFIGS = [make_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        raw = tfds.features.Encoding.BYTES

        def plane(*channels):
            return tfds.features.Tensor(shape=(size, size, *channels), dtype=np.uint8, encoding=raw)

        return self.dataset_info_from_configs(
            description="Shapes World: procedural scenes with instance/semantic/depth/edge ground truth.",
            features=tfds.features.FeaturesDict({
                "key": tfds.features.Text(),
                "seed": np.int64,
                "image": plane(3),
                "instance": plane(),
                "semantic": plane(),
                "depth": plane(),
                "edges": plane(),
                "objects": tfds.features.Text(),
                **{name: tfds.features.Text() for name in TEXT_FIELDS},
            }),
            # Keep records in key (= seed) order: record i of a split is seed i, so evaluation
            # order is reproducible; training shuffles in the grain pipeline anyway.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated
        return {split: self._generate_examples(split, n)
                for split, n in self.builder_config.split_sizes().items() if n > 0}

    def _generate_examples(self, split: str, num: int):

        c = self.builder_config
        world = shapes_world.WorldConfig.named(c.world, image_size=c.image_size, min_objects=c.min_objects,
                                               max_objects=c.max_objects)
        for seed in range(num):
            key = f"{split}-{seed:07d}"
            yield key, scene_to_example(key, seed, shapes_world.generate_scene(seed, world, split))


def builder(config: ShapesWorldConfig, data_dir: str) -> ShapesWorld:
    """The builder for `config` under `data_dir`, writing ArrayRecord."""
    # TFDS rejects a custom config that shares its name with a registered one; the name encodes every
    # field, so ask for the registered config by name.
    if config.name in {c.name for c in ShapesWorld.BUILDER_CONFIGS}:
        config = config.name
    return ShapesWorld(config=config, data_dir=data_dir, file_format="array_record")
