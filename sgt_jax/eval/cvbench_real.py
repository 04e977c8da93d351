"""CV-Bench (Cambrian-1's vision-centric benchmark) from a local copy of the release, for real runs.

Layouts read (any one, in this order): `test.jsonl` + `img/`; `test_2d.jsonl` + `test_3d.jsonl` +
`img/`; `test.parquet`; `test_2d.parquet` + `test_3d.parquet` (images as {bytes, path}). Fields
used: idx, type (2D/3D), task (Count, Relation, Depth, Distance), question, choices, answer
("(B)"), source (ADE20K, COCO, Omni3D), filename / image. 2,638 items in the release.

Answers, as the Shapes World analogue (`eval.cvbench`) reads them:
* `likelihood`: the choice whose training-format answer (" B" + <eos>) is most likely after the
  training prompt `question (A) x (B) y Answer:` (our MCQ layout, `text.format_mcq`);
* `generate`: greedy decoding, parsed by `eval.mcq.parse_answer` (unparsed = wrong).
Images are letterboxed to the ViT size as in training (`data.real_images.letterbox`).

Aggregation, the benchmark authors' rule (CV-Bench README, "Evaluation", huggingface.co/datasets/
nyu-visionx/CV-Bench; also the Cambrian eval script): accuracy per source, then
  accuracy_2d = (acc[ADE20K] + acc[COCO]) / 2,   accuracy_3d = acc[Omni3D],
  combined    = (accuracy_2d + accuracy_3d) / 2.
Per-task accuracies (Count, Relation, Depth, Distance) are reported beside it. A subset that lacks
a source averages the sources it has (`sources_present` says which).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sgt_jax.data import real_images

SOURCES_2D = ("ADE20K", "COCO")
SOURCES_3D = ("Omni3D",)
TASKS = ("Count", "Relation", "Depth", "Distance")
METHODS = ("likelihood", "generate", "both")
_LETTERS = "ABCDEFGH"


def find_layout(root: str) -> list[str]:
    for names in (["test.jsonl"], ["test_2d.jsonl", "test_3d.jsonl"], ["test.parquet"],
                  ["test_2d.parquet", "test_3d.parquet"]):
        paths = [os.path.join(root, n) for n in names]
        if all(os.path.exists(p) for p in paths):
            return paths
    raise FileNotFoundError(f"CV-Bench: {root} has none of test.jsonl, test_2d.jsonl + test_3d.jsonl, "
                            "test.parquet, test_2d.parquet + test_3d.parquet")


def _rows(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(ln) for ln in f if ln.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def answer_index(answer: Any, n_choices: int, where: str) -> int:
    """"(B)" / "B" -> 1; raises ValueError naming the item when it names no choice."""
    m = re.fullmatch(r"\s*\(?([A-H])\)?\s*", str(answer))
    if not m or _LETTERS.index(m.group(1)) >= n_choices:
        raise ValueError(f"CV-Bench {where}: answer {answer!r} is not one of "
                         f"{[f'({c})' for c in _LETTERS[:n_choices]]}")
    return _LETTERS.index(m.group(1))


def _image(row: Mapping[str, Any], root: str, where: str) -> np.ndarray:
    image = row.get("image")
    if isinstance(image, Mapping) and image.get("bytes"):
        return real_images.decode_image(image["bytes"])
    name = row.get("filename") or (image.get("path") if isinstance(image, Mapping) else image)
    if not name:
        raise ValueError(f"CV-Bench {where}: no image bytes and no filename")
    path = name if os.path.isabs(name) else os.path.join(root, name)
    if not os.path.exists(path) and not str(name).startswith("img"):
        path = os.path.join(root, "img", name)
    with open(path, "rb") as f:
        return real_images.decode_image(f.read())


def load_items(root: str, image_size: int, limit: int | None = None) -> list[dict]:
    """Items {idx, type, task, source, question, choices, answer (index), image uint8[S,S,3]} in
    file order (`limit` keeps the first ones, for smoke runs)."""
    items: list[dict] = []
    for path in find_layout(root):
        for i, row in enumerate(_rows(path)):
            if limit is not None and len(items) >= limit:
                return items
            where = f"{os.path.basename(path)} row {i} (idx {row.get('idx')})"
            missing = [k for k in ("question", "choices", "answer", "source") if k not in row]
            if missing:
                raise ValueError(f"CV-Bench {where}: missing fields {missing}")
            choices = [str(c) for c in row["choices"]]
            source = str(row["source"])
            if source not in SOURCES_2D + SOURCES_3D:
                raise ValueError(f"CV-Bench {where}: source {source!r} not in {list(SOURCES_2D + SOURCES_3D)}")
            items.append({"idx": row.get("idx", len(items)), "type": str(row.get("type", "")),
                          "task": str(row.get("task", "")), "source": source, "question": str(row["question"]),
                          "choices": choices, "answer": answer_index(row["answer"], len(choices), where),
                          "image": real_images.letterbox(_image(row, root, where), image_size)})
    return items


def aggregate(items: Sequence[Mapping[str, Any]], picks: Sequence[int | None]) -> dict[str, Any]:
    """The official CV-Bench numbers (see module doc) plus per-task accuracies and counts."""
    def acc(rows):
        return float(np.mean([p is not None and int(p) == int(it["answer"]) for it, p in rows])) if rows else None

    pairs = list(zip(items, picks, strict=True))
    by_source = {s: acc([(it, p) for it, p in pairs if it["source"] == s]) for s in SOURCES_2D + SOURCES_3D}
    by_task = {t: acc([(it, p) for it, p in pairs if it["task"] == t]) for t in TASKS}
    present_2d = [by_source[s] for s in SOURCES_2D if by_source[s] is not None]
    present_3d = [by_source[s] for s in SOURCES_3D if by_source[s] is not None]
    acc_2d = float(np.mean(present_2d)) if present_2d else None
    acc_3d = float(np.mean(present_3d)) if present_3d else None
    parts = [a for a in (acc_2d, acc_3d) if a is not None]
    return {"accuracy": float(np.mean(parts)) if parts else None, "accuracy_2d": acc_2d, "accuracy_3d": acc_3d,
            "per_source": by_source, "per_task": by_task,
            "n": {s: sum(it["source"] == s for it in items) for s in SOURCES_2D + SOURCES_3D},
            "sources_present": [s for s in SOURCES_2D + SOURCES_3D if by_source[s] is not None]}


def evaluate(run, root: str, *, method: str = "likelihood", batch_size: int = 16, limit: int | None = None,
             answer: Callable[[Sequence[Mapping]], Sequence[int | None]] | None = None,
             image_size: int | None = None) -> dict[str, Any]:
    """Score a UMM run (`eval.umm_eval.UMMRun`) on the local CV-Bench copy in `root`. `answer`
    replaces the model (items -> picked choice indices), e.g. an oracle in tests; then `image_size`
    gives the letterbox side (else the run's ViT size)."""
    from sgt_jax.eval import cvbench, mcq

    if method not in METHODS:
        raise ValueError(f"CV-Bench method {method!r} is not allowed; allowed: {list(METHODS)}")
    items = load_items(root, image_size or run.builder.layout.vit_image_size, limit)
    if answer is not None:
        res = aggregate(items, answer(items))
        res["method"] = "given"
        return res
    res: dict[str, Any] = {}
    if method in ("likelihood", "both"):
        res = aggregate(items, cvbench.answer_by_likelihood(run, items, batch_size))
        res["method"] = "likelihood"
    if method in ("generate", "both"):
        texts = cvbench.answer_by_generation(run, items, batch_size)
        picks = [mcq.parse_answer(t, it["choices"]) for t, it in zip(texts, items, strict=True)]
        gen = aggregate(items, picks)
        gen.update(method="generate", unparsed=float(np.mean([p is None for p in picks])),
                   examples=[{"question": it["question"], "answer": t} for it, t in zip(items[:3], texts[:3], strict=True)])
        if method == "generate":
            res = gen
        else:
            res["generate"] = gen
    return res


def format_table(res: Mapping[str, Any]) -> str:
    def pct(x):
        return "  n/a" if x is None else f"{100 * x:5.1f}"

    cols = [("CV-Bench", res["accuracy"]), ("2D", res["accuracy_2d"]), ("3D", res["accuracy_3d"])]
    cols += [(s, res["per_source"][s]) for s in SOURCES_2D + SOURCES_3D]
    cols += [(t, res["per_task"][t]) for t in TASKS]
    head = " ".join(f"{n:>8s}" for n, _ in cols)
    return f"CV-Bench ({res.get('method')}, n={sum(res['n'].values())})\n{head}\n" + \
        " ".join(f"{pct(v):>8s}" for _, v in cols)
