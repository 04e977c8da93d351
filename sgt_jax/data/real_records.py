"""What a real-data record is once read back, and turning stored bytes into it without TensorFlow.

Stored (by `tfds_real`): the letterboxed image as JPEG bytes, uint8 instance / class id maps at the
same size, conversations as JSON `[[question, answer], ...]`. Read back (`RealDecoder`): a dict
the task transforms of `sequences` understand:
  segmentation datasets  {key, image uint8[S,S,3], instance uint8[S,S]} (+ `target` for the
                         semantic proxy: class colours of `real_images.CATEGORY_PALETTE`); the
                         segmentation target is painted by `render.render_target` with our palette
  llava_onevision        {key, image, turns: [(question, answer), ...]}
A record whose image does not decode, whose mask has no instance or whose conversation is empty
becomes `records.Invalid(key, reason)`, which the pipeline skips, logs and counts.

Conversation rule (LLaVA `from` roles): human/user turns are questions, gpt/assistant turns answers;
consecutive questions are joined by a newline; a system turn is dropped; `<image>` placeholders are
removed (the image sits in the ViT span ahead of the text). Every answer becomes one loss-bearing
span of a single multi-turn row (`SequenceBuilder.conversation`).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sgt_jax.data import real_images, render
from sgt_jax.data.records import Invalid

IMAGE_TOKEN = "<image>"
_QUESTION_ROLES = ("human", "user")
_ANSWER_ROLES = ("gpt", "assistant")


def _clean(text: str) -> str:
    return str(text).replace(IMAGE_TOKEN, "").strip()


def conversation_turns(messages: Sequence[Mapping[str, Any]] | None) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(question, answer), ...] with non-empty answers (see module doc)."""
    turns: list[tuple[str, str]] = []
    pending: list[str] = []
    for m in messages or []:
        if not isinstance(m, Mapping):
            continue
        role, value = str(m.get("from", m.get("role", ""))).lower(), _clean(m.get("value", m.get("content", "")))
        if role in _QUESTION_ROLES:
            if value:
                pending.append(value)
        elif role in _ANSWER_ROLES:
            if value:
                turns.append(("\n".join(pending), value))
            pending = []
    return turns


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray, memoryview)) else str(value)


class RealDecoder:
    """`(raw bytes, fallback key) -> record | Invalid` for one real dataset and one task; picklable
    (grain workers receive it). `kind` is "segmentation" or "conversation"; `proxy` picks the
    target of a segmentation record ("segmentation", "semantic", "reconstruction", "mae")."""

    def __init__(self, deserialize: Callable[[bytes], Mapping[str, Any]], kind: str, proxy: str | None = None,
                 image_size: int | None = None):
        if kind not in ("segmentation", "conversation"):
            raise ValueError(f"unknown record kind {kind!r}; allowed: ['segmentation', 'conversation']")
        self.deserialize, self.kind, self.proxy, self.image_size = deserialize, kind, proxy, image_size

    def __call__(self, raw: bytes, fallback_key: str):
        try:
            ex = self.deserialize(raw)
            key = _text(ex["key"])
        except Exception as e:  # noqa: BLE001 (corrupt bytes surface as many exception types)
            return Invalid(fallback_key, f"undecodable: {type(e).__name__}: {str(e)[:200]}")
        try:
            image = real_images.decode_image(ex["image"])
        except (KeyError, ValueError) as e:
            return Invalid(key, f"undecodable: {e}")
        s = self.image_size
        if image.ndim != 3 or (s is not None and image.shape[:2] != (s, s)):
            return Invalid(key, f"bad_shape: image {image.shape}, want [{s},{s},3]")
        if self.kind == "conversation":
            try:
                turns = [(str(q), str(a)) for q, a in json.loads(_text(ex["turns"]))]
            except (KeyError, ValueError, TypeError) as e:
                return Invalid(key, f"undecodable: turns: {e}")
            if not turns:
                return Invalid(key, "empty_conversation: no question/answer turn")
            return {"key": key, "image": image, "turns": turns}
        instance = np.asarray(ex["instance"], np.uint8)
        if instance.shape != image.shape[:2]:
            return Invalid(key, f"bad_shape: instance {instance.shape}, want {image.shape[:2]}")
        if int(instance.max(initial=0)) == 0:
            return Invalid(key, "no_instance: the mask has no instance")
        if int(instance.max()) > real_images.MAX_INSTANCES:
            return Invalid(key, f"inconsistent_maps: instance id {int(instance.max())} > {real_images.MAX_INSTANCES}")
        record = {"key": key, "image": image, "instance": instance}
        if self.proxy == "semantic":
            if "semantic" not in ex:
                return Invalid(key, "missing_field: this dataset has no class map (semantic proxy)")
            record["target"] = real_images.category_to_rgb(np.asarray(ex["semantic"], np.uint8))
        elif self.proxy == "segmentation":
            record["target"] = render.instance_to_rgb(instance)  # our fixed palette, exact colours
        return record
