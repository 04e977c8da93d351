"""The paper-style report: several runs' eval/metrics.json -> a markdown table and PNG plots.

`write_report({"base": dir0, "+SFT": dir1, "+SFT+SGT": dir2}, "runs/demo/report.md")` writes the
comparison table (rows in the given order, plus a row "last - previous", i.e. SGT - SFT; columns as
in the paper: CV-Bench tasks and mean, GenEval tags and overall, segmentation mIoU; percentages),
the same for the held-out compositional split,
the probe-accuracy and attention-share plots (PNG, next to the markdown), and links to each run's
sample grids. `write_ablation_report({"segmentation": [seed dirs], ...}, path)` gives mean +- std
over seeds for the proxy ablation (configs/ablation_shapes.py).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from sgt_jax.eval.cvbench import CVBENCH_TASKS
from sgt_jax.eval.geneval import TAGS
from sgt_jax.eval.umm_results import read_metrics

# (part, key, column title)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("cvbench", "count", "Count"), ("cvbench", "relation", "Relation"), ("cvbench", "depth_order", "Depth"),
    ("cvbench", "distance", "Distance"), ("cvbench", "mean", "CV-Bench"),
    ("geneval", "single_object", "Single"), ("geneval", "two_object", "Two"), ("geneval", "counting", "Counting"),
    ("geneval", "colors", "Colors"), ("geneval", "position", "Position"), ("geneval", "color_attr", "Color attr"),
    ("geneval", "overall", "GenEval"), ("segmentation", "miou", "Seg mIoU"),
)
assert [c[1] for c in COLUMNS[:4]] == list(CVBENCH_TASKS) and [c[1] for c in COLUMNS[5:11]] == list(TAGS)


def _value(metrics: Mapping[str, Any], split: str, part: str, key: str) -> float:
    v = ((metrics.get("splits") or {}).get(split) or {}).get(part, {}).get(key)
    return float("nan") if v is None else float(v)


def _fmt(x: float, std: float | None = None) -> str:
    if not math.isfinite(x):
        return "–"
    s = f"{100 * x:.1f}"
    return s if std is None or not math.isfinite(std) else f"{s} ± {100 * std:.1f}"


def _table(rows: Sequence[tuple[str, list[str]]]) -> str:
    head = "| | " + " | ".join(c[2] for c in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    return "\n".join([head, sep] + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows])


def comparison_table(metrics: Mapping[str, Mapping[str, Any]], split: str = "test", delta: bool = True) -> str:
    """Markdown table, one row per run (dict order), values in percent. With `delta` and two or more
    runs, a last row gives the last run minus the one before it (in the demo: SGT - SFT only)."""
    rows = [(name, [_fmt(_value(m, split, p, k)) for p, k, _ in COLUMNS]) for name, m in metrics.items()]
    names = list(metrics)
    if delta and len(names) >= 2:
        a, b = metrics[names[-1]], metrics[names[-2]]
        cells = []
        for p, k, _ in COLUMNS:
            d = _value(a, split, p, k) - _value(b, split, p, k)
            cells.append("–" if not math.isfinite(d) else f"{100 * d:+.1f}")
        rows.append((f"Δ {names[-1]} − {names[-2]}", cells))
    return _table(rows)


def ablation_table(groups: Mapping[str, Sequence[Mapping[str, Any]]], split: str = "test") -> str:
    """Markdown table of mean ± std (sample std over seeds; 0 with one seed) per group."""
    rows = []
    for name, runs in groups.items():
        cells = []
        for p, k, _ in COLUMNS:
            vals = np.array([_value(m, split, p, k) for m in runs], float)
            vals = vals[np.isfinite(vals)]
            if not len(vals):
                cells.append("–")
                continue
            std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            cells.append(_fmt(float(vals.mean()), std))
        rows.append((f"{name} (n={len(runs)})", cells))
    return _table(rows)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, legend_ax, path: str) -> str:
    """Legend on the first panel, tight layout, PNG at `path`; frees the figure."""
    import matplotlib.pyplot as plt

    legend_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probes(metrics: Mapping[str, Mapping[str, Any]], path: str) -> str | None:
    """Probe test accuracy per layer, one panel per target, one line per run."""
    have = {n: m["probes"] for n, m in metrics.items() if m.get("probes")}
    if not have:
        return None
    plt = _pyplot()
    targets = [t for t in ("shape", "color", "count") if all(t in p for p in have.values())]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        for name, p in have.items():
            ax.plot(range(len(p["layers"])), [100 * a for a in p[t]["test_acc"]], marker="o", label=name)
        first = next(iter(have.values()))
        ax.axhline(100 * first[t]["chance"], color="grey", ls="--", lw=1, label="chance")
        ax.set_xticks(range(len(first["layers"])), first["layers"], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"linear probe: {t}")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
    return _save(fig, axes[0][0], path)


def read_train_history(workdir: str) -> list[dict]:
    """The run's logged training scalars (WORKDIR/metrics.jsonl, written by the train loop)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(runs: Mapping[str, str], path: str) -> str | None:
    """Training loss curves: total loss and the per-task losses of every run that logged them."""
    histories = {name: read_train_history(d) for name, d in runs.items()}
    histories = {n: h for n, h in histories.items() if any("train/loss" in r for r in h)}
    if not histories:
        return None
    keys = ["train/loss"] + sorted({k for h in histories.values() for r in h for k in r
                                    if k.startswith("train/loss/")})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.0 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for i, (name, h) in enumerate(histories.items()):  # one colour per run across panels
            pts = [(r["step"], r[key]) for r in h if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name, color=f"C{i}")
        ax.set_title(key.removeprefix("train/"))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, axes[0][0], path)


def plot_attention(metrics: Mapping[str, Mapping[str, Any]], path: str) -> str | None:
    """Left: share of attention from the last question tokens to the image, per layer. Right panels:
    share of the prompt attention that code positions give to each word kind, per layer."""
    have = {n: m["attention"] for n, m in metrics.items() if m.get("attention")}
    if not have:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    kinds = ("object", "color", "position", "other")
    fig, axes = plt.subplots(1, 1 + len(kinds), figsize=(3.6 * (1 + len(kinds)), 3.4), squeeze=False)
    ax = axes[0][0]
    for name, a in have.items():
        u = a["understanding"]
        ax.plot(range(1, len(u["image"]) + 1), [100 * v for v in u["image"]], marker="o", label=name)
    ax.set_title("understanding: question -> image")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("attention share (%)")
    ax.grid(alpha=0.3)
    for ax, kind in zip(axes[0][1:], kinds, strict=True):
        for name, a in have.items():
            g = a["generation"]
            ax.plot(range(1, len(g[kind]) + 1), [100 * v for v in g[kind]], marker="o", label=name)
        ax.set_title(f"generation: codes -> {kind} words")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("LLM layer")
        ax.grid(alpha=0.3)
    return _save(fig, axes[0][0], path)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def _settings_line(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    first = next(iter(metrics.values()))
    lines = []
    test = (first.get("splits") or {}).get("test") or {}
    cv, ge, seg = test.get("cvbench"), test.get("geneval"), test.get("segmentation")
    if cv:
        n = sum((cv.get("n") or {}).values())
        lines.append(f"- CV-Bench analogue: {n} multiple-choice items per split, answered by "
                     f"{cv.get('method')} ({'log-likelihood of each answer letter given image + question' if cv.get('method') == 'likelihood' else 'greedy decoding, parsed'}).")
    if ge:
        lines.append(f"- GenEval analogue: {ge.get('num_prompts')} prompts ({ge.get('images_per_prompt')} image each), "
                     f"exact detector + GenEval clause rules; sampling {ge.get('sampling')}.")
        lines.append("- GenEval ignores objects a prompt does not mention, so noisy images can pass; strict overall "
                     "(exactly the prompted detections) and mean detections per image (prompted: "
                     f"{ge.get('mean_prompted_objects', float('nan')):.1f}): " + "; ".join(_strict_cells(metrics)) + ".")
    if seg:
        lines.append(f"- Segmentation: instance mIoU of {seg.get('num_images')} masks generated by SGT inference "
                     f"(ids matched directly); sampling {seg.get('sampling')}.")
    a = first.get("attention")
    if a:
        lines.append(f"- Attention in generation: {a['generation'].get('method')}.")
    return lines


def _strict_cells(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    out = []
    for name, m in metrics.items():
        ge = ((m.get("splits") or {}).get("test") or {}).get("geneval") or {}
        if ge:
            strict = float((ge.get("strict") or {}).get("overall", float("nan")))
            out.append(f"{name} {_fmt(strict)} / {float(ge.get('mean_detections', float('nan'))):.1f}")
    return out


def _best_layer_lines(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    out = []
    for name, m in metrics.items():
        p = m.get("probes")
        if not p:
            continue
        parts = []
        for t in ("shape", "color", "count"):
            if t in p:
                accs = p[t]["test_acc"]
                i = int(np.argmax(accs))
                parts.append(f"{t} {100 * accs[i]:.1f} ({p['layers'][i]})")
        out.append(f"- {name}: best probe accuracy " + ", ".join(parts))
    return out


def report_markdown(runs: Mapping[str, str], out_dir: str, prefix: str = "report") -> tuple[str, list[str]]:
    """(markdown, written PNG paths) for runs {row name -> workdir with eval/metrics.json}."""
    metrics = {name: read_metrics(d) for name, d in runs.items()}
    os.makedirs(out_dir, exist_ok=True)
    pngs = [p for p in (plot_probes(metrics, os.path.join(out_dir, f"{prefix}_probes.png")),
                        plot_attention(metrics, os.path.join(out_dir, f"{prefix}_attention.png"))) if p]
    losses = plot_losses(runs, os.path.join(out_dir, f"{prefix}_losses.png"))
    md = ["## Results on Shapes World (test split)", "", comparison_table(metrics, "test"), ""]
    splits = {s for m in metrics.values() for s in (m.get("splits") or {})}
    if "heldout" in splits:
        md += ["## Held-out compositional split (colour x shape pairs unseen in training)", "",
               comparison_table(metrics, "heldout"), ""]
    md += ["All numbers in percent. Settings:"] + _settings_line(metrics) + [""]
    if pngs:
        md += ["## Linear probes and attention", ""] + _best_layer_lines(metrics) + [""]
        md += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in pngs] + [""]
    if losses:
        md += ["## Training losses", "", f"![losses]({os.path.relpath(losses, out_dir)})", ""]
        pngs.append(losses)
    samples = []
    for name, m in metrics.items():
        res = (m.get("splits") or {}).get("test") or {}
        cells = []
        for part in ("geneval", "segmentation"):
            path = os.path.join(runs[name], "eval", str((res.get(part) or {}).get("samples", "")))
            cells.append(f"![{name} {part}]({os.path.relpath(path, out_dir)})" if os.path.isfile(path) else "–")
        if any(c != "–" for c in cells):
            samples.append(f"| {name} | " + " | ".join(cells) + " |")
    if samples:
        md += ["## Samples (test split)", "", "GenEval: one row per tag (single, two, counting, colors, position, "
               "colour attribute). Segmentation: input, truth, generated mask.", "",
               "| | GenEval samples | Segmentation samples |", "|---|---|---|"] + samples + [""]
    return "\n".join(md), pngs


def write_report(runs: Mapping[str, str], out_path: str) -> str:
    """Write the comparison report for `runs` {row name -> workdir} to `out_path` (PNGs next to it);
    returns the markdown."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    prefix = os.path.splitext(os.path.basename(out_path))[0]
    md, _ = report_markdown(runs, out_dir, prefix)
    with open(out_path, "w") as f:
        f.write(md + "\n")
    return md


def write_ablation_report(groups: Mapping[str, Sequence[str]], out_path: str) -> str:
    """Mean ± std over seeds per group {proxy name -> [workdirs]}; returns the markdown."""
    metrics = {name: [read_metrics(d) for d in dirs] for name, dirs in groups.items()}
    md = ["## Proxy ablation on Shapes World (test split, mean ± std over seeds)", "", ablation_table(metrics, "test"), ""]
    if any("heldout" in (m.get("splits") or {}) for runs in metrics.values() for m in runs):
        md += ["## Held-out compositional split", "", ablation_table(metrics, "heldout"), ""]
    md = "\n".join(md)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        f.write(md + "\n")
    return md
