"""GenEval's clause logic over detections (the rules are documented in `sgt_jax.eval.geneval`).

The data layer generates GenEval-style prompts whose clauses must hold in their scene
(`text.geneval_prompt`), and the evaluator scores generated images by the same rules, so the rules
live here, below both.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from sgt_jax.data.shapes_world import scene_objects

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Relations that hold for object a with respect to object b (boxes [x0, y0, x1, y1])."""
    a, b = np.asarray(box_a, float), np.asarray(box_b, float)
    ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    size_a, size_b = a[2:] - a[:2], b[2:] - b[:2]
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def evaluate_detections(detections: Sequence[Mapping[str, Any]], spec: Mapping[str, Any]) -> tuple[bool, str]:
    """(correct, reason) for one image's detections ({shape, color, bbox, area}) against a prompt spec."""
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for d in sorted(detections, key=lambda d: -d.get("area", 0)):
        by_class.setdefault(d["shape"], []).append(d)
    groups: list[list[Mapping[str, Any]] | None] = []
    correct, reasons = True, []
    for req in spec.get("include", []):
        cls, count = req["class"], int(req["count"])
        found = by_class.get(cls, [])
        ok = True
        chosen = found[:count]  # GenEval: the most confident (here: largest) first, colour checked afterwards
        if len(chosen) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif req.get("color") is not None and sum(d["color"] == req["color"] for d in chosen) < count:
            ok = False
            reasons.append(f"expected {req['color']} {cls}>={count}, found "
                           f"{sum(d['color'] == req['color'] for d in chosen)} {req['color']}")
        elif req.get("position"):
            rel, target = req["position"][0], int(req["position"][1])
            targets = groups[target] if target < len(groups) else None
            if targets is None:
                ok = False
                reasons.append(f"no target for {cls} {rel}")
            else:
                for d in chosen:
                    if any(rel not in relative_position(d["bbox"], t["bbox"]) for t in targets):
                        ok = False
                        reasons.append(f"{cls} not {rel} target")
                        break
        groups.append(chosen if ok else None)
        correct &= ok
    for req in spec.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        if len(by_class.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(by_class[cls])}")
    return correct, "; ".join(reasons)


def scene_detections(scene: Mapping[str, Any]) -> list[dict]:
    """Ground-truth 'detections' of a scene (for building prompt scenes and testing the clause logic)."""
    return [{"shape": o["shape"], "color": o["color"], "bbox": list(o["bbox"]), "area": int(o["area"])}
            for o in scene_objects(scene)]
