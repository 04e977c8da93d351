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

from typing import Any, Callable, Iterable, Mapping

import numpy as np

# The clause rules are part of the data (prompts are generated so that they hold in their scene);
# they live in sgt_jax/data/geneval_rules.py and are re-exported here for the scorers.
from sgt_jax.data.geneval_rules import (  # noqa: E402, F401
    POSITION_THRESHOLD,
    RELATIONS,
    TAGS,
    evaluate_detections,
    relative_position,
    scene_detections,
)


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
