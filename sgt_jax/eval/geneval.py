"""GenEval analogue: clause logic over detections, scored per image, per tag and overall.

Mirrors GenEval's evaluation rules (read, not copied):
* A prompt carries `include` clauses {class, count, optional color, optional position: [relation,
  index of an earlier include clause]} and `exclude` clauses {class, count}.
* include: at least `count` detections of `class`; with `color`, at least `count` of those have that
  colour; with `position`, every chosen object stands in `relation` to every object chosen by the
  referenced clause. As in GenEval, the `count` most confident detections of the class are chosen
  first and then their colour is checked (so a wrong-coloured object that outranks a right-coloured one
  fails the clause). Our detector has no confidences; the area stands in for it (largest first).
* exclude: fails when at least `count` detections of `class` exist (so "three stars" = include 3,
  exclude 4: exact counts).
* position rule: with box centres c_a, c_b and sizes (w, h), offset = c_a - c_b is shrunk towards 0 by
  0.1 x (size_a + size_b) per axis, divided by |offset|; "left of" holds when the x part is below -0.5,
  "right of" above 0.5, "above" when the y part (image y points down) is below -0.5, "below" above 0.5.
* Each image scores 0/1; a tag's score is the mean over its images; overall = unweighted mean of the
  six tag scores.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

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
        chosen = found[:count]  # most confident (here: largest) first, colour checked afterwards
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


def evaluate_image(image: np.ndarray, spec: Mapping[str, Any],
                   detect_fn: Callable[[np.ndarray], list] | None = None) -> dict:
    """Detect objects in one generated image and apply the prompt's clauses."""
    if detect_fn is None:
        from sgt_jax.eval.detector import detect as detect_fn
    dets = detect_fn(image)
    ok, reason = evaluate_detections(dets, spec)
    return {"tag": spec.get("tag"), "correct": bool(ok), "reason": reason, "detections": dets}


def score(results: Iterable[Mapping[str, Any]], intervals: bool = False) -> dict[str, Any]:
    """Per-tag mean of the binary image scores and `overall` = unweighted mean over the tags present.
    With `intervals`: `ci` {tag: Wilson 95% [lo, hi], overall: Wilson over all images} and `n`.
    (Images of one prompt are not independent; with several images per prompt the interval is a
    little narrow, which the report states.)"""
    from sgt_jax.eval import stats

    per: dict[str, list[bool]] = {}
    for r in results:
        per.setdefault(r["tag"], []).append(bool(r["correct"]))
    out: dict[str, Any] = {t: float(np.mean(v)) for t, v in per.items()}
    tags = [t for t in TAGS if t in out] + [t for t in out if t not in TAGS]
    out["overall"] = float(np.mean([out[t] for t in tags])) if tags else float("nan")
    if intervals and tags:
        out["ci"] = {t: list(stats.wilson(int(np.sum(per[t])), len(per[t]))) for t in tags}
        # overall = mean of equal-sized tags = the pooled rate: Wilson on all images (no degenerate
        # zero-width interval at 0 or 1)
        flat = [x for t in tags for x in per[t]]
        out["ci"]["overall"] = list(stats.wilson(int(np.sum(flat)), len(flat)))
        out["n"] = {t: len(per[t]) for t in tags}
    return out


def scene_detections(scene: Mapping[str, Any]) -> list[dict]:
    """Ground-truth 'detections' of a scene (for building prompt scenes and testing the clause logic)."""
    from sgt_jax.data.shapes_world import scene_objects

    return [{"shape": o["shape"], "color": o["color"], "bbox": list(o["bbox"]), "area": int(o["area"])}
            for o in scene_objects(scene)]
