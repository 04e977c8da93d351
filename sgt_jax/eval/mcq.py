"""Scoring multiple-choice answers (the CV-Bench analogue) from free-form generated text.

Why a parser: a UMM answers in text. We accept the forms models actually produce: a letter ("B",
"(B)", "B.", "Answer: B", "the answer is (b)") or the choice's own text ("left", "the red star").
Anything else, or text naming several different choices, counts as wrong (None), never as a guess.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np

_LETTERS = "ABCDEFGH"


def parse_answer(text: str, choices: Sequence[str]) -> int | None:
    """Index of the choice a generated answer picks, or None when it picks none or several."""
    t = " ".join(str(text).strip().split())
    if not t:
        return None
    letters = _LETTERS[: len(choices)]
    m = re.fullmatch(rf"\(?([{letters}])\)?[.:)]?", t, re.IGNORECASE)
    if m:
        return letters.index(m.group(1).upper())
    m = re.match(rf"^(?:answer\s*(?:is)?\s*:?\s*|the answer is\s*)?\(([{letters}])\)", t, re.IGNORECASE) \
        or re.match(rf"^(?:answer\s*(?:is)?\s*:?\s*|the answer is\s*)\(?([{letters}])\b", t, re.IGNORECASE) \
        or re.match(rf"^([{letters}])[.:)]\s", t)
    if m:
        return letters.index(m.group(1).upper())
    low = t.lower().rstrip(".!")
    exact = [i for i, c in enumerate(choices) if low == str(c).lower() or low == f"the {str(c).lower()}"]
    if len(exact) == 1:
        return exact[0]
    hits = {i for i, c in enumerate(choices) if re.search(rf"(?<![\w-]){re.escape(str(c).lower())}(?![\w-])", low)}
    # a choice contained in another one ("red star" in "the red star") counts once: keep maximal hits
    hits = {i for i in hits if not any(j != i and str(choices[i]).lower() in str(choices[j]).lower() for j in hits)}
    return hits.pop() if len(hits) == 1 else None


def score(questions: Iterable[Mapping], answers: Iterable[str]) -> dict[str, float]:
    """Accuracy per task (`<task>`), `mean` = unweighted mean over tasks, `overall` = over all items,
    `unparsed` = fraction of answers that picked no single choice."""
    per: dict[str, list[bool]] = {}
    unparsed = []
    for q, a in zip(questions, answers, strict=True):
        idx = parse_answer(a, q["choices"])
        unparsed.append(idx is None)
        per.setdefault(q["task"], []).append(idx == int(q["answer"]))
    out = {t: float(np.mean(v)) for t, v in per.items()}
    out["mean"] = float(np.mean([out[t] for t in per])) if per else float("nan")
    out["overall"] = float(np.mean([x for v in per.values() for x in v])) if per else float("nan")
    out["unparsed"] = float(np.mean(unparsed)) if unparsed else float("nan")
    return out
