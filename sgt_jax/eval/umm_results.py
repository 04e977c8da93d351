"""UMM evaluation results: the metrics file (JSON, NaN -> null), its headline numbers, the printed table."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np
from etils import epath

from sgt_jax.eval.cvbench import CVBENCH_TASKS
from sgt_jax.eval.geneval import TAGS

METRICS_FILE = os.path.join("eval", "metrics.json")


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def write_metrics(workdir: str, metrics: Mapping[str, Any]) -> str:
    """Write `<workdir>/eval/metrics.json` atomically (NaN -> null) and return its path (epath: gs:// too)."""
    path = epath.Path(workdir, METRICS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = epath.Path(os.fspath(path) + ".tmp")
    tmp.write_text(json.dumps(_jsonable(metrics), indent=1, sort_keys=False))
    tmp.replace(path)
    return os.fspath(path)


def read_metrics(workdir_or_file: str) -> dict:
    path = workdir_or_file if workdir_or_file.endswith(".json") else os.path.join(workdir_or_file, METRICS_FILE)
    return json.loads(epath.Path(path).read_text())


def _pct(x) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * float(x):5.1f}"


def format_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text summary: one row per split, then probes and attention (percentages)."""
    short = {"count": "count", "relation": "rel", "depth_order": "depth", "distance": "dist",
             "single_object": "single", "two_object": "two", "counting": "counting", "colors": "colors",
             "position": "pos", "color_attr": "c_attr"}
    cols = [("cvbench", t) for t in CVBENCH_TASKS] + [("cvbench", "mean")] + \
        [("geneval", t) for t in TAGS] + [("geneval", "overall"), ("segmentation", "miou")]
    names = [short.get(k, k) if part != "segmentation" else "seg_mIoU" for part, k in cols]
    names = [("cv_" + n if part == "cvbench" and n == "mean" else n) for (part, _), n in zip(cols, names, strict=True)]
    head = f"{'split':8s} " + " ".join(f"{n:>8s}" for n in names)
    lines = [f"UMM evaluation: {metrics.get('workdir') or '<in memory>'} (step {metrics.get('step')})", head]
    for split, res in metrics.get("splits", {}).items():
        vals = [_pct((res.get(part) or {}).get(k)) for part, k in cols]
        lines.append(f"{split:8s} " + " ".join(f"{v:>8s}" for v in vals))
    for split, res in metrics.get("splits", {}).items():
        g = res.get("geneval")
        if g:
            lines.append(f"geneval/{split} sampling: {g.get('sampling')}, {g.get('num_images')} images")
            break
    p = metrics.get("probes")
    if p:
        for t in ("shape", "color", "count"):
            if t in p:
                accs = p[t]["test_acc"]
                best = int(np.argmax(accs))
                lines.append(f"probe {t:6s} test acc per layer: " + " ".join(_pct(a).strip() for a in accs)
                             + f"  (best {p['layers'][best]}, chance {_pct(p[t]['chance']).strip()})")
        lines.append("probe layers: " + " ".join(p["layers"]))
    a = metrics.get("attention")
    if a:
        u = a["understanding"]
        lines.append("attention last question tokens -> image, per layer: "
                     + " ".join(_pct(v).strip() for v in u["image"]))
        g = a["generation"]
        for k in ("object", "color", "position", "count", "other"):
            lines.append(f"attention codes -> {k:8s} words (share of prompt), per layer: "
                         + " ".join(_pct(v).strip() for v in g[k]))
    if metrics.get("timing_s"):
        lines.append("time (s): " + ", ".join(f"{k} {v}" for k, v in metrics["timing_s"].items()))
    return "\n".join(lines)


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The table's numbers as a flat dict ("test/cvbench/mean": 0.61, ...) plus the metrics file."""
    out: dict[str, Any] = {}
    for split, res in (metrics.get("splits") or {}).items():
        for part, key in (("cvbench", "mean"), ("geneval", "overall"), ("segmentation", "miou")):
            if part in res:
                out[f"{split}/{part}/{key}"] = res[part].get(key)
    if metrics.get("metrics_file"):
        out["metrics_file"] = metrics["metrics_file"]
    return _jsonable(out)
