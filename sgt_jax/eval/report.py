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
from etils import epath

from sgt_jax.eval import stats
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
# intervals, controls and paired verdicts
# ---------------------------------------------------------------------------------------------
_TASK_NAMES = {"count": "Count", "relation": "Relation", "depth_order": "Depth", "distance": "Distance",
               "mean": "CV-Bench mean"}


def _part(m: Mapping[str, Any], split: str, part: str) -> dict:
    return ((m.get("splits") or {}).get(split) or {}).get(part) or {}


def _ci(lo_hi) -> str:
    if not lo_hi or any(v is None or not math.isfinite(float(v)) for v in lo_hi):
        return "–"
    return f"[{100 * float(lo_hi[0]):.1f}, {100 * float(lo_hi[1]):.1f}]"


def _letters(dist: Mapping[str, float] | None) -> str:
    if not dist:
        return "–"
    return " ".join(f"{k}{100 * v:.0f}" for k, v in dist.items() if v or k != "none")


def cvbench_detail(metrics: Mapping[str, Mapping[str, Any]], split: str = "test") -> str:
    """Per run and task: accuracy with its Wilson 95% interval, chance, blind control, CircularEval,
    letters picked, and whether the model uses the image at all (sighted vs blind, exact McNemar)."""
    head = ("| run | task | n | accuracy [95% CI] | chance | blind (grey image) | circular (chance) | "
            "letters picked (%) | sighted vs blind |")
    lines = [head, "|---|---|---:|---|---:|---|---|---|---|"]
    for name, m in metrics.items():
        cv = _part(m, split, "cvbench")
        if not cv:
            continue
        for t in list(CVBENCH_TASKS) + ["mean"]:
            if t not in cv:
                continue
            n = (cv.get("n") or {}).get(t, sum((cv.get("n") or {}).values()) if t == "mean" else 0)
            blind = cv.get("blind") or {}
            circ = cv.get("circular") or {}
            vis = (cv.get("visual") or {}).get(t) or {}
            blind_cell = f"{_fmt(blind[t])} {_ci((blind.get('ci') or {}).get(t))}" if t in blind else "–"
            circ_cell = (f"{_fmt(circ[t])} ({_fmt((circ.get('chance') or {}).get(t, float('nan')))})"
                         if t in circ else "–")
            verdict = f"{vis['says']} (p={vis['p']:.3g})" if vis else "–"
            lines.append(f"| {name} | {_TASK_NAMES[t]} | {n} | {_fmt(cv[t])} {_ci((cv.get('ci') or {}).get(t))} | "
                         f"{_fmt((cv.get('chance') or {}).get(t, float('nan')))} | {blind_cell} | {circ_cell} | "
                         f"{_letters((cv.get('letters') or {}).get(t))} | {verdict} |")
    return "\n".join(lines)


def visual_summary(metrics: Mapping[str, Mapping[str, Any]], split: str = "test") -> list[str]:
    """One plain line per run: on which tasks the blind control scores the same as the sighted model."""
    out = []
    for name, m in metrics.items():
        vis = _part(m, split, "cvbench").get("visual") or {}
        if not vis:
            continue
        blind = [_TASK_NAMES[t] for t in CVBENCH_TASKS if t in vis and vis[t]["says"].startswith("blind ≈ sighted")]
        seeing = [_TASK_NAMES[t] for t in CVBENCH_TASKS if t in vis and vis[t]["says"].startswith("uses the image")]
        if len(blind) == len(vis):
            out.append(f"- **{name}: blind ≈ sighted on every task: learned nothing visual.**")
        else:
            out.append(f"- {name}: uses the image on {', '.join(seeing) or 'no task'}; blind ≈ sighted (learned "
                       f"nothing visual) on {', '.join(blind) or 'no task'}.")
    return out


def generation_detail(metrics: Mapping[str, Mapping[str, Any]], split: str = "test") -> str:
    """GenEval per tag with Wilson 95% intervals, the strict score beside it, and segmentation mIoU with
    its bootstrap interval and the VQ's reconstruction ceiling."""
    lines = ["| run | " + " | ".join(TAGS) + " | GenEval overall | strict overall | Seg mIoU [95% CI] | VQ ceiling |",
             "|---|" + "---|" * (len(TAGS) + 4)]
    for name, m in metrics.items():
        ge, seg = _part(m, split, "geneval"), _part(m, split, "segmentation")
        if not ge and not seg:
            continue
        ci = ge.get("ci") or {}
        cells = [f"{_fmt(ge[t])} {_ci(ci.get(t))}" if t in ge else "–" for t in TAGS]
        strict = ge.get("strict") or {}
        cells.append(f"{_fmt(ge['overall'])} {_ci(ci.get('overall'))}" if "overall" in ge else "–")
        cells.append(f"{_fmt(strict['overall'])} {_ci((strict.get('ci') or {}).get('overall'))}"
                     if "overall" in strict else "–")
        cells.append(f"{_fmt(seg['miou'])} {_ci(seg.get('miou_ci'))}" if seg.get("miou") is not None else "–")
        cells.append(_fmt(seg["vq_ceiling_miou"]) if seg.get("vq_ceiling_miou") is not None else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _correct(cv: Mapping[str, Any], task: str | None, key: str = "pick") -> np.ndarray:
    per = cv.get("per_item") or {}
    if key not in per:
        return np.zeros(0, bool)
    tasks, answers, picks = per["task"], per["answer"], per[key]
    sel = [k for k, t in enumerate(tasks) if task is None or t == task]
    if key == "circular":
        return np.array([bool(picks[k]) for k in sel], bool)
    return np.array([picks[k] is not None and int(picks[k]) == int(answers[k]) for k in sel], bool)


def paired_tests(a: Mapping[str, Any], b: Mapping[str, Any], split: str = "test") -> dict[str, dict]:
    """Run a vs run b on the same items: exact McNemar per CV-Bench task, over all items, under
    CircularEval and on GenEval images; paired bootstrap on per-image segmentation mIoU. Empty when
    the runs were not scored on identical items (different digests)."""
    out: dict[str, dict] = {}
    ca, cb = _part(a, split, "cvbench"), _part(b, split, "cvbench")
    if ca.get("per_item") and cb.get("per_item") and ca.get("items_digest") == cb.get("items_digest"):
        for t in CVBENCH_TASKS:
            xa, xb = _correct(ca, t), _correct(cb, t)
            if xa.size:
                out[t] = stats.mcnemar(xa, xb)
        out["all items"] = stats.mcnemar(_correct(ca, None), _correct(cb, None))
        if "circular" in ca["per_item"] and "circular" in cb["per_item"]:
            out["circular"] = stats.mcnemar(_correct(ca, None, "circular"), _correct(cb, None, "circular"))
    ga, gb = _part(a, split, "geneval").get("per_image"), _part(b, split, "geneval").get("per_image")
    if ga and gb and ga["tag"] == gb["tag"]:
        out["GenEval"] = stats.mcnemar(ga["correct"], gb["correct"])
    sa, sb = _part(a, split, "segmentation").get("per_image_miou"), _part(b, split, "segmentation").get("per_image_miou")
    if sa and sb and len(sa) == len(sb):
        keep = [k for k in range(len(sa)) if sa[k] is not None and sb[k] is not None]
        out["Seg mIoU"] = stats.paired_bootstrap([sa[k] for k in keep], [sb[k] for k in keep])
    return out


def paired_table(metrics: Mapping[str, Mapping[str, Any]], pairs: Sequence[tuple[str, str]],
                 split: str = "test") -> str:
    """One row per (a, b, measure): the paired difference, its test and the verdict."""
    lines = ["| comparison | measure | n | a − b (points) | a right, b wrong / b right, a wrong | p | verdict |",
             "|---|---|---:|---:|---|---:|---|"]
    for x, y in pairs:
        if x not in metrics or y not in metrics:
            continue
        tests = paired_tests(metrics[x], metrics[y], split)
        if not tests:
            lines.append(f"| {x} vs {y} | – | – | – | – | – | not comparable (different items or no per-item data) |")
        for key, t in tests.items():
            label = _TASK_NAMES.get(key, key)
            if "p" in t:
                lines.append(f"| {x} vs {y} | {label} | {t['n']} | {100 * t['delta']:+.1f} | "
                             f"{t['a_only']} / {t['b_only']} | {t['p']:.3g} | {t['verdict']} |")
            else:
                lines.append(f"| {x} vs {y} | {label} (mIoU) | {t['n']} | {100 * t['delta']:+.1f} "
                             f"[{100 * t['lo']:+.1f}, {100 * t['hi']:+.1f}] | paired bootstrap | – | {t['verdict']} |")
    return "\n".join(lines)


def interval_note(metrics: Mapping[str, Mapping[str, Any]], split: str = "test") -> str:
    """What the sample sizes can resolve: the 95% half-width of a 50% accuracy at the items per task."""
    first = next(iter(metrics.values()))
    cv = _part(first, split, "cvbench")
    n = min((cv.get("n") or {}).values(), default=0)
    ge = _part(first, split, "geneval")
    per_tag = min(((ge.get("ci") and ge.get("n")) or {}).values(), default=0) if ge else 0
    bits = []
    if n:
        bits.append(f"{n} items per CV-Bench task give a 95% interval of about ±{100 * stats.half_width(n):.0f} "
                    f"points at 50% accuracy (two runs differ reliably only by ~{100 * 1.4 * stats.half_width(n):.0f}"
                    " points or more)")
    if per_tag:
        bits.append(f"{per_tag} images per GenEval tag give ±{100 * stats.half_width(per_tag):.0f} points")
    return ("Sample sizes: " + "; ".join(bits) + ".") if bits else ""


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
    with epath.Path(path).open("wb") as f:  # epath: gs:// as well as local
        fig.savefig(f, dpi=110, format="png")
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
    path = epath.Path(workdir, "metrics.jsonl")
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def evidence_sections(metrics: Mapping[str, Mapping[str, Any]], pairs: Sequence[tuple[str, str]] | None = None,
                      split: str = "test") -> list[str]:
    """The sections that make the table readable: sample-size note, CV-Bench controls, generation
    intervals and the paired verdicts (default pairs: each run against the one before it)."""
    names = list(metrics)
    pairs = list(pairs) if pairs is not None else [(names[k + 1], names[k]) for k in range(len(names) - 1)]
    md = []
    note = interval_note(metrics, split)
    if note:
        md += [note, ""]
    if any(_part(m, split, "cvbench") for m in metrics.values()):
        md += [f"### CV-Bench analogue: intervals, chance, blind control, CircularEval ({split} split)", ""]
        md += visual_summary(metrics, split) + [""]
        md += [cvbench_detail(metrics, split), "",
               "Blind = the same items with the image replaced by flat grey. Circular = MMBench CircularEval "
               "(right only if right under every rotation of the options; a constant letter scores 0). "
               "Sighted vs blind: exact McNemar test on the same items.", ""]
    if any(_part(m, split, "geneval") or _part(m, split, "segmentation") for m in metrics.values()):
        md += [f"### Generation: GenEval per tag and segmentation, with 95% intervals ({split} split)", "",
               generation_detail(metrics, split), "",
               "GenEval intervals are Wilson intervals over images (images of one prompt are not independent, so "
               "with several images per prompt they are slightly narrow); mIoU intervals are bootstrap over images; "
               "the VQ ceiling is the frozen tokenizer's reconstruction mIoU of the true masks.", ""]
    if pairs:
        md += [f"### Paired comparisons on the same items ({split} split)", "", paired_table(metrics, pairs, split), "",
               "Exact McNemar test on the discordant items (paired bootstrap for mIoU); 'significant at 95%' "
               "means p < 0.05 (interval excludes 0), otherwise the two runs are not distinguishable here.", ""]
    return md


def report_markdown(runs: Mapping[str, str], out_dir: str, prefix: str = "report",
                    pairs: Sequence[tuple[str, str]] | None = None, footer: Sequence[str] = ()) -> tuple[str, list[str]]:
    """(markdown, written PNG paths) for runs {row name -> workdir with eval/metrics.json}."""
    metrics = {name: read_metrics(d) for name, d in runs.items()}
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    pngs = [p for p in (plot_probes(metrics, os.path.join(out_dir, f"{prefix}_probes.png")),
                        plot_attention(metrics, os.path.join(out_dir, f"{prefix}_attention.png"))) if p]
    losses = plot_losses(runs, os.path.join(out_dir, f"{prefix}_losses.png"))
    md = ["## Results on Shapes World (test split)", "", comparison_table(metrics, "test"), ""]
    splits = {s for m in metrics.values() for s in (m.get("splits") or {})}
    if "heldout" in splits:
        md += ["## Held-out compositional split (colour x shape pairs unseen in training)", "",
               comparison_table(metrics, "heldout"), ""]
    md += ["All numbers in percent. Settings:"] + _settings_line(metrics) + [""]
    md += evidence_sections(metrics, pairs, "test")
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
            cells.append(f"![{name} {part}]({os.path.relpath(path, out_dir)})" if epath.Path(path).is_file() else "–")
        if any(c != "–" for c in cells):
            samples.append(f"| {name} | " + " | ".join(cells) + " |")
    if samples:
        md += ["## Samples (test split)", "", "GenEval: one row per tag (single, two, counting, colors, position, "
               "colour attribute). Segmentation: input, truth, generated mask.", "",
               "| | GenEval samples | Segmentation samples |", "|---|---|---|"] + samples + [""]
    md += list(footer)
    return "\n".join(md), pngs


def write_report(runs: Mapping[str, str], out_path: str, pairs: Sequence[tuple[str, str]] | None = None,
                 footer: Sequence[str] = ()) -> str:
    """Write the comparison report for `runs` {row name -> workdir} to `out_path` (PNGs next to it);
    returns the markdown."""
    out_dir = os.fspath(epath.Path(out_path).parent)
    prefix = os.path.splitext(os.path.basename(out_path))[0]
    md, _ = report_markdown(runs, out_dir, prefix, pairs, footer)
    epath.Path(out_path).write_text(md + "\n")
    return md


# (part, key, title) of the ablation's summary columns; "cvbench/circular" reads the CircularEval mean
ABLATION_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("cvbench", "count", "Count"), ("cvbench", "relation", "Relation"), ("cvbench", "depth_order", "Depth"),
    ("cvbench", "distance", "Distance"), ("cvbench", "mean", "CV-Bench"), ("cvbench", "circular", "CV circular"),
    ("cvbench", "blind", "CV blind"),
    ("geneval", "overall", "GenEval"), ("geneval", "strict", "GenEval strict"), ("segmentation", "miou", "Seg mIoU"),
)


def _column_value(m: Mapping[str, Any], split: str, part: str, key: str) -> float:
    d = _part(m, split, part)
    if part == "cvbench" and key in ("circular", "blind"):
        v = (d.get(key) or {}).get("mean")
    elif part == "geneval" and key == "strict":
        v = (d.get("strict") or {}).get("overall")
    else:
        v = d.get(key)
    return float("nan") if v is None else float(v)


def _seed_cell(values: Sequence[float]) -> str:
    si = stats.seed_interval(values)
    if not si["n"]:
        return "–"
    if si["n"] == 1:
        return f"{_fmt(si['mean'])} (1 seed)"
    return f"{_fmt(si['mean'])} [{100 * si['lo']:.1f}, {100 * si['hi']:.1f}]"


def _paired_seeds(a_runs, b_runs) -> int:
    """Seeds paired between two rows: seed s of a with seed s of b, s < min of their counts. A single
    run (the base) pairs with seed 0 only: repeating its answers against every seed of the other row
    would count the same items several times in McNemar (the pairs are then not independent) and
    turn the seed t-test into a test against a constant."""
    return min(len(a_runs), len(b_runs))


def _pooled(a_runs, b_runs, split, getter) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate paired per-item correctness over the paired seeds (`_paired_seeds`)."""
    xa, xb = [], []
    for s in range(_paired_seeds(a_runs, b_runs)):
        ma, mb = a_runs[s], b_runs[s]
        ga, gb = getter(ma, split), getter(mb, split)
        if ga is None or gb is None or len(ga) != len(gb):
            return np.zeros(0, bool), np.zeros(0, bool)
        xa.append(ga)
        xb.append(gb)
    return np.concatenate(xa), np.concatenate(xb)


def _cv_items(key):
    def get(m, split):
        cv = _part(m, split, "cvbench")
        return _correct(cv, None, key) if cv.get("per_item") and key in cv["per_item"] else None
    return get


def _ge_items(m, split):
    pi = _part(m, split, "geneval").get("per_image")
    return np.asarray(pi["correct"], bool) if pi else None


def ablation_comparisons(groups: Mapping[str, Sequence[Mapping[str, Any]]], reference: str,
                         split: str = "test") -> list[dict[str, Any]]:
    """Each row against `reference` (SFT only): per measure the mean difference over the paired seeds
    (`_paired_seeds`), the exact McNemar test pooled over those seeds and items, the paired t-test
    over seeds, and the verdict, which is "significant at 95%" only when both tests agree (item noise
    and training-seed noise; McNemar alone with one paired seed)."""
    ref = groups[reference]
    out = []
    measures = (("CV-Bench (all items)", _cv_items("pick"), ("cvbench", "overall")),
                ("CV-Bench circular", _cv_items("circular"), None),
                ("GenEval", _ge_items, ("geneval", "overall")))
    for name, runs in groups.items():
        if name == reference:
            continue
        for label, getter, _seed_key in measures:
            xa, xb = _pooled(runs, ref, split, getter)
            if not xa.size:
                continue
            mc = stats.mcnemar(xa, xb)
            n = _paired_seeds(runs, ref)
            per_seed_a = [float(np.mean(getter(runs[s], split))) for s in range(n)]
            per_seed_b = [float(np.mean(getter(ref[s], split))) for s in range(n)]
            pt = stats.paired_t(per_seed_a, per_seed_b) if n >= 2 else {"p": float("nan")}
            both = mc["verdict"] == stats.SIGNIFICANT and (n < 2 or pt.get("verdict") == stats.SIGNIFICANT)
            out.append({"row": name, "measure": label, "delta": float(np.mean(per_seed_a) - np.mean(per_seed_b)),
                        "seeds": n, "items": int(xa.size), "mcnemar_p": mc["p"], "a_only": mc["a_only"],
                        "b_only": mc["b_only"], "seed_t_p": pt.get("p", float("nan")),
                        "verdict": stats.SIGNIFICANT if both else stats.NOT_DISTINGUISHABLE})
        sa = [r for r in runs if _part(r, split, "segmentation").get("per_image_miou")]
        sb = [r for r in ref if _part(r, split, "segmentation").get("per_image_miou")]
        if sa and sb:
            n = _paired_seeds(sa, sb)
            a = np.concatenate([_part(sa[s], split, "segmentation")["per_image_miou"] for s in range(n)]).astype(float)
            b = np.concatenate([_part(sb[s], split, "segmentation")["per_image_miou"] for s in range(n)]).astype(float)
            keep = np.isfinite(a) & np.isfinite(b)
            pb = stats.paired_bootstrap(a[keep], b[keep])
            out.append({"row": name, "measure": "Seg mIoU (per image)", "delta": pb["delta"], "seeds": n,
                        "items": pb["n"], "ci": [pb["lo"], pb["hi"]], "verdict": pb["verdict"]})
    return out


def ablation_markdown(groups: Mapping[str, Sequence[Mapping[str, Any]]], reference: str | None = None,
                      split: str = "test") -> str:
    """The proxy ablation: rows {title: [metrics per seed]} with mean and 95% t-interval across seeds,
    then every row against `reference` with the paired tests and a verdict."""
    head = "| row | seeds | " + " | ".join(c[2] for c in ABLATION_COLUMNS) + " |"
    lines = [head, "|---|---:|" + "---|" * len(ABLATION_COLUMNS)]
    for name, runs in groups.items():
        cells = [_seed_cell([_column_value(m, split, p, k) for m in runs]) for p, k, _ in ABLATION_COLUMNS]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    md = ["Mean over seeds with its 95% Student-t interval across seeds (percent).", "", "\n".join(lines), ""]
    if reference and reference in groups:
        rows = ablation_comparisons(groups, reference, split)
        t = ["| row | measure | Δ vs " + reference + " (points) | seeds | items (pooled) | McNemar p | seed t-test p | "
             "verdict |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if "ci" in r:
                t.append(f"| {r['row']} | {r['measure']} | {100 * r['delta']:+.1f} [{100 * r['ci'][0]:+.1f}, "
                         f"{100 * r['ci'][1]:+.1f}] | {r['seeds']} | {r['items']} | paired bootstrap | – | {r['verdict']} |")
            else:
                tp = r["seed_t_p"]
                t.append(f"| {r['row']} | {r['measure']} | {100 * r['delta']:+.1f} | {r['seeds']} | {r['items']} | "
                         f"{r['mcnemar_p']:.3g} | {'–' if not math.isfinite(tp) else f'{tp:.3g}'} | {r['verdict']} |")
        md += [f"Paired against {reference} on the same items: exact McNemar over items pooled across seeds "
               "(seed s against seed s; a single run, such as the base, against seed 0 only) and the paired "
               "t-test over seeds; the verdict is 'significant at 95%' only when both are (with one paired seed, "
               "McNemar alone).", "", "\n".join(t), ""]
    return "\n".join(md)


def write_ablation_report(groups: Mapping[str, Sequence[str]], out_path: str, reference: str | None = None) -> str:
    """`ablation_markdown` over {row: [workdirs or metrics.json paths]} written to `out_path`."""
    metrics = {name: [read_metrics(d) for d in dirs] for name, dirs in groups.items()}
    md = "## Proxy ablation on Shapes World (test split)\n\n" + ablation_markdown(metrics, reference, "test")
    epath.Path(out_path).parent.mkdir(parents=True, exist_ok=True)  # epath: gs:// as well as local
    epath.Path(out_path).write_text(md + "\n")
    return md
