"""One released item -> one stored example of a real dataset, or a skip reason. No TensorFlow.

Pure functions of (key, raw item, stored side), so `tfds_real` can run them in worker processes
(spawned: they import only numpy / PIL) and keep the output order. Each returns
`("ok", tfds_key, example)` or `("skip", key, "category: details")`; the categories are those of
`tfds_real` (missing_file, undecodable, no_instance, empty_conversation, no_image).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from sgt_jax.data import real_images
from sgt_jax.data.real_records import conversation_turns

Result = tuple[str, str, Any]


def _letterbox_image(data: bytes, size: int) -> tuple[bytes, tuple[int, int]]:
    image = real_images.decode_image(data)
    return real_images.encode_jpeg(real_images.letterbox(image, size)), image.shape[:2]


def _letterbox_ids(ids: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Id map -> image resolution -> stored square, nearest-neighbour only; pad = background."""
    ids = real_images.resize_ids_to_image(ids, height, width)
    return real_images.letterbox(ids.astype(np.uint8), size, nearest=True, pad_value=0)


def sam_example(key: str, item: Mapping[str, Any], size: int) -> Result:
    """SAM-SGT pair: instances = the mask's flat colours, ordered by area (`real_images`)."""
    if "error" in item:
        return "skip", key, item["error"]
    try:
        jpeg, (h, w) = _letterbox_image(item["image"], size)
        mask = real_images.decode_image(item["mask"])
    except ValueError as e:
        return "skip", key, f"undecodable: {e}"
    ids, dropped = real_images.order_instances(real_images.colour_mask_to_segments(mask))
    instance = _letterbox_ids(ids, h, w, size)
    n = len(np.unique(instance[instance > 0]))
    if n == 0:
        return "skip", key, "no_instance: the mask has no instance"
    return "ok", key, {"key": key, "image": jpeg, "instance": instance, "num_instances": n,
                       "dropped_instances": dropped, "source_size": np.array([h, w], np.int32)}


def coco_example(key: str, item: Mapping[str, Any], size: int, class_index: Mapping[int, int],
                 is_thing: Mapping[int, bool]) -> Result:
    """COCO panoptic: non-crowd thing segments are instances (by area); every segment keeps its class."""
    if "error" in item:
        return "skip", key, item["error"]
    try:
        jpeg, (h, w) = _letterbox_image(item["image"], size)
        seg = real_images.panoptic_ids(real_images.decode_image(item["panoptic"]))
    except ValueError as e:
        return "skip", key, f"undecodable: {e}"
    infos = item["segments_info"]
    things = np.array([int(s["id"]) for s in infos
                       if is_thing.get(int(s["category_id"]), False) and not s.get("iscrowd", 0)], np.int64)
    ids, dropped = real_images.order_instances(seg, things)
    semantic = np.zeros(seg.shape, np.uint8)
    for s in infos:
        semantic[seg == int(s["id"])] = class_index.get(int(s["category_id"]), 0)
    instance = _letterbox_ids(ids, h, w, size)
    n = len(np.unique(instance[instance > 0]))
    if n == 0:
        return "skip", key, "no_instance: no thing instance in the panoptic map"
    return "ok", key, {"key": key, "image": jpeg, "instance": instance, "semantic": _letterbox_ids(semantic, h, w, size),
                       "num_instances": n, "dropped_instances": dropped, "source_size": np.array([h, w], np.int32)}


def llava_example(key: str, item: Mapping[str, Any], size: int) -> Result:
    """LLaVA-OneVision record: conversation turns (`real_records.conversation_turns`) + the image."""
    if "error" in item:
        return "skip", key, item["error"]
    turns = conversation_turns(item.get("conversations"))
    if not turns:
        return "skip", key, "empty_conversation: no question/answer turn"
    if item.get("image") is None:
        return "skip", key, "no_image: " + (f"{item['image_name']} not found" if item.get("image_name")
                                            else "the record has no image (text-only)")
    try:
        jpeg, (h, w) = _letterbox_image(item["image"], size)
    except ValueError as e:
        return "skip", key, f"undecodable: {e}"
    return "ok", item["uid"], {"key": key, "image": jpeg, "turns": json.dumps(turns),
                               "data_source": item["data_source"], "source_size": np.array([h, w], np.int32)}
