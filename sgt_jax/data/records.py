"""What a well-formed Shapes World record is, checked before any transform sees it.

A record that fails here (undecodable bytes, wrong shape or dtype, empty object list, maps that
disagree with each other or with the object list) is turned into an `Invalid(key, reason)` marker
so that the input pipeline can skip and count it instead of crashing or feeding it to the model.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np

MAP_KEYS = ("instance", "semantic", "depth", "edges")
REQUIRED_KEYS = ("key", "image", *MAP_KEYS, "objects")


@dataclasses.dataclass(frozen=True)
class Invalid:
    """Marker that replaces a bad record in the stream. `reason` starts with a short category."""

    key: str
    reason: str

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0]


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    return str(value)


def parse_record(example: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a TFDS-decoded example (numpy, bytes for text) into Python-friendly fields.

    Text fields (`key`, `split`, `background`, ...) become str, `seed` int, `objects` the list of dicts from its JSON text. Raises
    ValueError/KeyError/UnicodeDecodeError on malformed text; callers map that to `Invalid`.
    """
    record = {k: (_text(v) if isinstance(v, (bytes, bytearray)) else v) for k, v in example.items()}
    record["key"] = _text(record["key"])
    if "seed" in record:
        record["seed"] = int(np.asarray(record["seed"]))
    objects = record["objects"]
    if not isinstance(objects, list):
        objects = json.loads(_text(objects))
    record["objects"] = objects
    return record


def validate_record(record: Mapping[str, Any], *, image_size: int | None = None) -> str | None:
    """Return None for a good record, else a reason string "category: details".

    Checks the structural contract of `shapes_world.generate_scene` (uint8 image [H,W,3]; uint8
    maps [H,W]; non-empty object list) and the cross-map consistency that makes the ground truth
    exact: instance ids refer to listed objects, foreground agrees between instance and semantic
    maps, each instance has one semantic class, edges are binary, and each visible object's `area`
    equals its instance pixel count.
    """
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return f"missing_field: {missing}"
    image = record["image"]
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        return f"bad_dtype: image is {type(image).__name__}/{getattr(image, 'dtype', None)}, want uint8"
    if image.ndim != 3 or image.shape[-1] != 3:
        return f"bad_shape: image {image.shape}, want [H,W,3]"
    height, width = image.shape[:2]
    if image_size is not None and (height, width) != (image_size, image_size):
        return f"bad_shape: image {image.shape}, want [{image_size},{image_size},3]"
    for name in MAP_KEYS:
        value = record[name]
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8:
            return f"bad_dtype: {name} is {type(value).__name__}/{getattr(value, 'dtype', None)}, want uint8"
        if value.shape != (height, width):
            return f"bad_shape: {name} {value.shape}, want {(height, width)}"
    objects = record["objects"]
    if not isinstance(objects, list) or not objects:
        return "empty_objects: the scene lists no objects"
    if not all(isinstance(o, dict) and "shape" in o for o in objects):
        return "bad_objects: every object must be a dict with a 'shape'"
    instance, semantic = record["instance"], record["semantic"]
    if int(instance.max()) > len(objects):
        return f"inconsistent_maps: instance id {int(instance.max())} but only {len(objects)} objects"
    if not np.array_equal(instance > 0, semantic > 0):
        return "inconsistent_maps: instance and semantic foreground differ"
    pairs = np.unique(instance.astype(np.int32) * 256 + semantic)
    ids = pairs // 256
    if len(np.unique(ids)) != len(ids):
        return "inconsistent_maps: an instance spans several semantic classes"
    if int(record["edges"].max()) > 1:
        return "inconsistent_maps: edges must be 0/1"
    areas = np.bincount(instance.ravel(), minlength=len(objects) + 1)[1:]
    for k, obj in enumerate(objects):
        if "area" in obj and int(obj["area"]) != int(areas[k]):
            return f"inconsistent_maps: object {k + 1} area {obj['area']} != {int(areas[k])} instance pixels"
    return None


def decode_and_validate(raw: bytes, deserialize: Callable[[bytes], Mapping[str, Any]], fallback_key: str,
                        *, image_size: int | None = None) -> dict[str, Any] | Invalid:
    """Deserialize raw record bytes and validate them; never raises on bad data.

    `fallback_key` names the record (e.g. "train[17]") when its own key cannot be read.
    """
    try:
        record = parse_record(deserialize(raw))
    except Exception as e:  # corrupt bytes surface as many exception types (proto, reshape, json)
        return Invalid(fallback_key, f"undecodable: {type(e).__name__}: {str(e)[:200]}")
    reason = validate_record(record, image_size=image_size)
    if reason is not None:
        return Invalid(record.get("key") or fallback_key, reason)
    return record


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """Random-access raw records and their TF-free deserializer; picklable for grain workers.

    `decode(raw, fallback_key) -> record | records.Invalid`, when set, replaces the Shapes World
    deserialize + validate (real datasets: `real_records.RealDecoder`)."""

    raw: Sequence[bytes]
    deserialize: Callable[[bytes], Mapping[str, Any]]
    name: str
    decode: Callable[[bytes, str], Any] | None = None

    @classmethod
    def from_tfds(cls, data_source, name: str) -> "RecordSource":
        """From `builder.as_data_source(split)`: read raw bytes, deserialize with numpy only."""
        return cls(raw=data_source.data_source, deserialize=data_source.dataset_info.features.deserialize_example_np,
                   name=name)

    def __len__(self) -> int:
        return len(self.raw)
