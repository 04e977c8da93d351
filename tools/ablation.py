"""The paper's proxy ablation on Shapes World, from one command, resumable per stage.

    python tools/ablation.py                                   # full profile, 3 seeds -> results/shapes_ablation/
    python tools/ablation.py --profile=quick --seeds=3         # the demo's recipe, from the shipped base
    python tools/ablation.py --profile=micro --rows=none,segmentation --seeds=1 --ratios= --no-equal_vqa \
        --out=/tmp/abl --work=/tmp/abl_runs                    # proves the machinery in minutes
    python tools/ablation.py --dry_run                         # print the plan only

Stages (each its own process through tools/train.py / tools/evaluate.py, like tools/demo.py):
data -> VQ -> base -> base_eval, then for every row (none = "+SFT only", edge, reconstruction, depth,
mae, semantic, segmentation = "+SGT") and seed: post-training from the same base (equal steps and
batch size, `configs/ablation_shapes.py`) and its evaluation; the segmentation mixing-ratio sweep
(0:1, 1:1, 2:1, 3:1) at seed 0 (0:1 is the SFT-only run, 2:1 the segmentation run: reused); and the
equal-VQA-examples run (segmentation at seed 0 with (ratio + 1) x the steps, so it sees as many VQA
rows as SFT only; the paper's setup is equal steps). A finished stage leaves a marker in
WORK/.done and is skipped on a re-run; interrupted training resumes from its checkpoint.

Carrying a run to another checkout or machine: WORK is not committed, OUT is. `--report_only` writes
the report of the runs finished so far (no stage runs); commit OUT, and the same command on a fresh
checkout restores every finished run (its evaluation and markers) from OUT/runs/ and
OUT/manifest.json when the stage's command is unchanged, and trains only what is left.

Mixing: `--mixing=batches` (default) interleaves whole single-task batches (two segmentation
batches, then one SFT batch), as the paper's OmniGen2 code does; `--mixing=rows` mixes rows in every
batch (what `make demo` uses).

Writes OUT/report.md (rows: mean and 95% interval across seeds; each row against SFT only with exact
McNemar pooled over seeds and the paired t-test over seeds; the ratio sweep; equal steps vs equal VQA
examples), OUT/runs/<name>.json (every run's eval/metrics.json), OUT/summary.json, OUT/*.png and
OUT/manifest.json (the exact command, git commit, machine, stage times). Exit code 2 on bad flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import provenance  # noqa: E402  (tools/provenance.py)

ROWS: tuple[str, ...] = ("base", "none", "edge", "reconstruction", "depth", "mae", "semantic", "segmentation")
TITLES = {"base": "base", "none": "+SFT only", "edge": "+SFT+Edge", "reconstruction": "+SFT+Reconstruction",
          "depth": "+SFT+Depth", "mae": "+SFT+MAE", "semantic": "+SFT+Semantic",
          "segmentation": "+SFT+SGT (instance segmentation)"}
REFERENCE = "none"
DEFAULT_RATIOS = (0.0, 1.0, 2.0, 3.0)

# Config args and evaluation budgets per profile. full: the configs' defaults (f=4 VQ, the full
# evaluation: 500 MCQ items a task, 50 prompts x 4 images a GenEval tag, 200 masks). quick: the demo's
# recipe (`:quick` configs, 32 px), post-training from the shipped base unless --base is given. micro: smoke models and data, a few steps, a tiny evaluation (plumbing only).
_MICRO_DATA = ("--config.data.train_size=64", "--config.data.validation_size=16", "--config.data.test_size=16",
               "--config.data.heldout_size=16")
PROFILES = {
    "full": {"vq": "", "base": "", "post": "", "train_flags": (), "eval": ()},
    "quick": {"vq": "f8,size=32", "base": "quick", "post": "quick", "train_flags": (), "image_size": 32,
              "shipped_base": os.path.join(ROOT, "results", "base_search", "base_quick"),
              "eval": ("mcq_items=128", "geneval_prompts_per_tag=16", "geneval_images_per_prompt=1", "seg_images=64")},
    "micro": {"vq": "smoke", "base": "smoke", "post": "smoke", "train_flags": _MICRO_DATA,
              "eval": ("mcq_items=4", "geneval_prompts_per_tag=1", "geneval_images_per_prompt=1", "seg_images=2",
                       "parts=('cvbench','geneval','segmentation')", "splits=('test',)", "batch_size=8")},
}


@dataclasses.dataclass
class Stage:
    name: str
    argv: list[str]


@dataclasses.dataclass
class Plan:
    stages: list[Stage]
    groups: dict[str, list[str]]  # row -> workdirs (one per seed)
    ratios: dict[str, str]  # "r:1" -> workdir (seed 0)
    equal_vqa: dict[str, str]  # label -> workdir
    data_dir: str


def _ratio_name(r: float) -> str:
    return f"{r:g}:1"


def make_plan(work: str, profile: str, *, rows: Sequence[str], seeds: int, ratios: Sequence[float],
              equal_vqa: bool, mixing: str, base: str | None = None, python: str = sys.executable,
              eval_overrides: Sequence[str] = ()) -> Plan:
    """Every stage in order, and where each row's runs live."""
    p = dict(PROFILES[profile])
    p["eval"] = (*p["eval"], *eval_overrides)
    data = os.path.join(work, "data")
    common = [f"--config.data.data_dir={data}", *p["train_flags"]]
    stages: list[Stage] = []

    def arg(*parts):
        return ",".join(x for x in parts if x)

    def train(name, config, workdir):
        stages.append(Stage(name, [python, "tools/train.py", f"--config={config}", f"--workdir={workdir}", *common]))

    def evaluate(name, workdir):
        stages.append(Stage(f"{name}_eval", [python, "tools/evaluate.py", f"--workdir={workdir}", f"--data_dir={data}",
                                             *[f"--config.eval.umm.{o}" for o in p["eval"]]]))

    base = base or p.get("shipped_base")
    base_dir = os.path.join(work, "base")
    if profile != "micro":  # micro builds its small dataset on first use (the VQ stage)
        stages.append(Stage("data", [python, "tools/build_dataset.py", "--dataset=shapes_world",
                                     f"--data_dir={data}", f"--image_size={p.get('image_size', 64)}"]))
    if base is not None:  # copied (exactly, float32) so its evaluation writes under WORK, not into the base
        stages.append(Stage("base", [python, "tools/export_params.py", f"--workdir={base}", f"--out={base_dir}",
                                     "--dtype=float32"]))
    else:
        vq_dir = os.path.join(work, "vq")
        train("vq", "configs/vq_shapes.py" + (f":{p['vq']}" if p["vq"] else ""), vq_dir)
        train("base", "configs/base_shapes.py:" + arg(f"vq={vq_dir}", p["base"]), base_dir)
    groups: dict[str, list[str]] = {}
    if "base" in rows:
        evaluate("base", base_dir)
        groups["base"] = [base_dir]

    def post(name, proxy, seed, *extra):
        d = os.path.join(work, name)
        cfg = "configs/ablation_shapes.py:" + arg(f"proxy={proxy}", f"seed={seed}", f"base={base_dir}",
                                                   f"mixing={mixing}", p["post"], *extra)
        if not any(s.name == name for s in stages):
            train(name, cfg, d)
            evaluate(name, d)
        return d

    for row in rows:
        if row != "base":
            groups[row] = [post(f"{row}_s{s}", row, s) for s in range(seeds)]
    ratio_dirs: dict[str, str] = {}
    for r in ratios:
        if r == 0:
            ratio_dirs[_ratio_name(r)] = post("none_s0", "none", 0)
        elif r == 2:
            ratio_dirs[_ratio_name(r)] = post("segmentation_s0", "segmentation", 0)
        else:
            ratio_dirs[_ratio_name(r)] = post(f"segmentation_ratio{r:g}_s0", "segmentation", 0, f"ratio={r:g}")
    eq: dict[str, str] = {}
    if equal_vqa:
        steps = _post_steps(p["post"])
        eq["SFT only (equal steps)"] = post("none_s0", "none", 0)
        eq["SGT, equal steps (the paper)"] = post("segmentation_s0", "segmentation", 0)
        eq[f"SGT, equal VQA examples ({3 * steps} steps)"] = post("segmentation_equal_vqa_s0", "segmentation", 0,
                                                                  f"steps={3 * steps}")
    return Plan(stages, groups, ratio_dirs, eq, data)


def _post_steps(post_arg: str) -> int:
    """Steps of one post-training run at this profile (SFT only and every proxy train the same): the
    finalized config's, which derives them from train.num_examples (unfinalized, train.steps is -1)."""
    from sgt_jax.config import config_module, finalize

    mod = config_module(os.path.join(ROOT, "configs", "ablation_shapes.py"))
    steps = int(finalize(mod.get_config(",".join(x for x in ("proxy=segmentation", post_arg) if x))).train.steps)
    if steps <= 0:
        raise ValueError(f"post-training at profile arg {post_arg!r} has {steps} steps")
    return steps


def _portable(argv: Sequence[str], work: str) -> list[str]:
    """A stage's argv with the work dir and the checkout written as WORK / ROOT (comparable across machines)."""
    return [a.replace(work, "WORK").replace(ROOT, "ROOT") for a in argv]


_NOT_RESTORED = ("data", "vq", "base")  # cheap, or needed on disk by the runs that are left


def restore_finished(work: str, out: str, stages: Sequence[Stage]) -> list[str]:
    """Restore, from a committed OUT, every finished post-training run and evaluation whose stage
    commands match the plan: its metrics into WORK/<run>/eval/ and its markers into WORK/.done, with
    the recorded stage times. -> the names restored. Data, VQ and base stages always run again."""
    from sgt_jax.eval.umm_results import METRICS_FILE

    path = os.path.join(out, "manifest.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        manifest = json.load(f)
    recorded, seconds = manifest.get("stage_argv") or {}, manifest.get("stage_seconds") or {}
    names = {s.name: s for s in stages}
    restored: list[str] = []
    for s in stages:
        if not s.name.endswith("_eval") or os.path.exists(os.path.join(work, ".done", s.name)):
            continue
        workdir = next(a.split("=", 1)[1] for a in s.argv if a.startswith("--workdir="))
        saved = os.path.join(out, "runs", os.path.basename(os.path.normpath(workdir)) + ".json")
        train = names.get(s.name[: -len("_eval")])
        pair = [s] + ([train] if train is not None and train.name not in _NOT_RESTORED else [])
        if not os.path.exists(saved) or any(recorded.get(t.name) != _portable(t.argv[1:], work)
                                            or t.name not in seconds for t in pair):
            continue
        os.makedirs(os.path.dirname(os.path.join(workdir, METRICS_FILE)), exist_ok=True)
        shutil.copyfile(saved, os.path.join(workdir, METRICS_FILE))
        os.makedirs(os.path.join(work, ".done"), exist_ok=True)
        for t in pair:
            if not os.path.exists(os.path.join(work, ".done", t.name)):
                with open(os.path.join(work, ".done", t.name), "w") as f:
                    json.dump({"seconds": seconds[t.name], "argv": t.argv[1:], "restored_from": path,
                               "commit": manifest.get("stages_commit") or manifest.get("commit", "unknown")}, f)
                restored.append(t.name)
    return restored


def finished_stages(work: str, stages: Sequence[Stage], fallback_commit: str) -> tuple[dict[str, float], str]:
    """(stage times, the commit(s) they ran at) of the stages with a marker; a marker without a commit
    (written before markers recorded it) counts as `fallback_commit`."""
    seconds, commits = {}, {}
    for s in stages:
        marker = os.path.join(work, ".done", s.name)
        if os.path.exists(marker):
            with open(marker) as f:
                m = json.load(f)
            seconds[s.name] = m["seconds"]
            commits.setdefault(m.get("commit") or fallback_commit, []).append(s.name)
    if len(commits) <= 1:
        return seconds, next(iter(commits), fallback_commit)
    return seconds, "; ".join(f"{c} ({len(names)} stages: {', '.join(names)})" for c, names in commits.items())


def run_stages(work: str, stages: Sequence[Stage], runner: Callable[[list[str]], int] | None = None) -> None:
    """Run the stages in order, skipping those with a marker in WORK/.done. Each marker keeps the
    stage's time, command and commit (`finished_stages` reads them back for the manifest)."""
    done = os.path.join(work, ".done")
    os.makedirs(done, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_COMPILATION_CACHE_DIR=os.path.join(work, ".jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    run = runner or (lambda argv: subprocess.call(argv, cwd=ROOT, env=env))
    commit = provenance.git_commit()
    for i, s in enumerate(stages, 1):
        marker = os.path.join(done, s.name)
        if os.path.exists(marker):
            print(f"[{i}/{len(stages)}] {s.name}: done earlier, skipped", flush=True)
            continue
        print(f"\n[{i}/{len(stages)}] {s.name}\n  $ {' '.join(s.argv[1:])}", flush=True)
        t = time.time()
        rc = run(s.argv)
        if rc != 0:
            raise SystemExit(f"stage {s.name} failed with exit code {rc}; re-run the same command to resume")
        with open(marker, "w") as f:
            json.dump({"seconds": round(time.time() - t, 1), "argv": s.argv[1:], "commit": commit}, f)


def _machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    try:
        import jax

        info["jax"] = jax.__version__
        info["devices"] = [str(d) for d in jax.devices()]
    except Exception as e:  # the report still gets written without jax details
        info["devices"] = f"unavailable: {e}"
    return info


def write_results(out: str, plan: Plan, command: list[str], timings: dict[str, float], profile: str, mixing: str,
                  seeds: int, work: str = "", stages_commit: str = "") -> str:
    """OUT/report.md, runs/*.json, summary.json, plots, manifest.json from the evaluated runs.
    `stages_commit`: the commit(s) the stages ran at (`finished_stages`)."""
    from sgt_jax.eval import report, stats
    from sgt_jax.eval.umm_results import METRICS_FILE, read_metrics

    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    saved: dict[str, str] = {}

    def load(workdir):
        path = os.path.join(workdir, METRICS_FILE)
        if not os.path.exists(path):
            return None
        name = os.path.basename(os.path.normpath(workdir))
        dst = os.path.join(out, "runs", f"{name}.json")
        shutil.copyfile(path, dst)
        saved[name] = os.path.relpath(dst, out)
        return read_metrics(path)

    groups = {}
    for row, dirs in plan.groups.items():
        ms = [m for m in (load(d) for d in dirs) if m is not None]
        if ms:
            groups[TITLES[row]] = ms
    ref = TITLES[REFERENCE] if TITLES[REFERENCE] in groups else None
    left = [s.name for s in plan.stages if s.name not in timings]
    md = [f"# Proxy ablation on Shapes World ({profile} profile, mixing = {mixing}, {seeds} seed(s))", "",
          *([f"**Partial: {len(left)} of {len(plan.stages)} stages not run yet** ({', '.join(left)}); every "
             "row below is over the runs finished so far.", ""] if left else []),
          "Post-training rows start from the same base checkpoint with equal steps and batch size and differ only "
          "in the proxy task. Test split.", ""]
    if groups:
        md += ["## Rows", "", report.ablation_markdown(groups, ref, "test"), ""]
        if any("heldout" in (m.get("splits") or {}) for ms in groups.values() for m in ms):
            md += ["## Rows on the held-out compositional split (colour x shape pairs unseen in training)", "",
                   report.ablation_markdown(groups, ref, "heldout"), ""]
        first = next(iter(groups.values()))[0]
        note = report.interval_note({"x": first}, "test")
        if note:
            md += [note, ""]
    ratio_metrics = {k: m for k, m in ((k, load(d)) for k, d in plan.ratios.items()) if m is not None}
    if ratio_metrics:
        names = {f"segmentation {k}": m for k, m in ratio_metrics.items()}
        md += ["## Segmentation mixing ratio (proxy : VQA), seed 0", "", report.comparison_table(names, "test", delta=False),
               "", report.cvbench_detail({k: v for k, v in names.items()}, "test"), ""]
        keys = list(names)
        md += [report.paired_table(names, [(k, keys[0]) for k in keys[1:]], "test"), ""]
    eq_metrics = {k: m for k, m in ((k, load(d)) for k, d in plan.equal_vqa.items()) if m is not None}
    if len(eq_metrics) >= 2:
        keys = list(eq_metrics)
        md += ["## Equal steps vs equal VQA examples, seed 0", "",
               "At 2:1 SGT sees a third of the VQA rows SFT only sees in the same steps; the last row trains 3x the "
               "steps so that it sees as many.", "", report.comparison_table(eq_metrics, "test", delta=False), "",
               report.paired_table(eq_metrics, [(k, keys[0]) for k in keys[1:]], "test"), ""]
    pngs = _plots(out, groups, ratio_metrics)
    md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] + [""]
    commit = provenance.git_commit()
    stages_commit = stages_commit or commit
    md += ["## Provenance", "", f"- command: `{' '.join(command)}`", f"- stages ran at commit: {stages_commit}",
           *([f"- report written at commit: {commit}"] if commit != stages_commit else []),
           f"- machine: {json.dumps(_machine())}", f"- finished: {datetime.datetime.now(datetime.timezone.utc).isoformat()}",
           f"- per-run metrics: `runs/` ({len(saved)} files)", ""]
    text = "\n".join(md)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    summary = {"profile": profile, "mixing": mixing, "seeds": seeds,
               "rows": {name: {c[2]: stats.seed_interval([report._column_value(m, "test", c[0], c[1]) for m in ms])
                               for c in report.ABLATION_COLUMNS} for name, ms in groups.items()},
               "vs_reference": report.ablation_comparisons(groups, ref, "test") if ref else [], "runs": saved}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"command": command, "commit": commit, "stages_commit": stages_commit, "machine": _machine(),
                   "stage_seconds": timings,
                   "stages_left": left, "work": work,
                   "stage_argv": {s.name: _portable(s.argv[1:], work) for s in plan.stages}}, f, indent=1)
    return text


def _plots(out: str, groups, ratio_metrics) -> list[str]:
    from sgt_jax.eval import report, stats

    if not groups:
        return []
    plt = report._pyplot()
    cols = [c for c in report.ABLATION_COLUMNS if c[1] in ("mean", "circular", "overall", "miou")]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6), squeeze=False)
    names = list(groups)
    for ax, (part, key, title) in zip(axes[0], cols, strict=True):
        means, errs = [], []
        for n in names:
            si = stats.seed_interval([report._column_value(m, "test", part, key) for m in groups[n]])
            means.append(100 * si["mean"])
            errs.append(0 if si["n"] < 2 else 100 * (si["hi"] - si["mean"]))
        ax.bar(range(len(names)), means, yerr=errs, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths = [os.path.join(out, "ablation_rows.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    if len(ratio_metrics) >= 2:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        xs = [float(k.split(":")[0]) for k in ratio_metrics]
        for part, key, title in cols:
            ax.plot(xs, [100 * report._column_value(m, "test", part, key) for m in ratio_metrics.values()], marker="o",
                    label=title)
        ax.set_xlabel("segmentation : VQA")
        ax.set_ylabel("percent")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, "ablation_ratio.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def parse_args(argv: Sequence[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/shapes_ablation", help="report, per-run JSON, plots, manifest")
    ap.add_argument("--work", default="runs/shapes_ablation", help="checkpoints and logs of every stage")
    ap.add_argument("--profile", default="full", help=f"one of {list(PROFILES)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                    help="segmentation : VQA ratios for the sweep at seed 0 (empty: skip)")
    ap.add_argument("--equal_vqa", action=argparse.BooleanOptionalAction, default=True,
                    help="also run SGT with 3x steps (as many VQA rows as SFT only)")
    ap.add_argument("--mixing", default="batches", help="rows | batches (data.mixing of every post-training run)")
    ap.add_argument("--base", default=None, help="start from this base UMM run or export (copied into WORK/base; "
                    "skips VQ and base training; the quick profile defaults to the shipped "
                    "results/base_search/base_quick)")
    ap.add_argument("--eval", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="extra eval.umm overrides for every evaluation, e.g. mcq_items=300 splits=('test',)")
    ap.add_argument("--dry_run", action="store_true", help="print the plan and exit")
    ap.add_argument("--report_only", action="store_true",
                    help="run no stage: write OUT from the runs finished so far (commit it to carry the run on)")
    args = ap.parse_args(argv)
    if args.profile not in PROFILES:
        ap.error(f"--profile={args.profile!r} is not allowed; allowed: {list(PROFILES)}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        ap.error(f"--rows={args.rows!r}: unknown {bad or 'empty'}; allowed: {list(ROWS)}")
    if args.seeds < 1:
        ap.error(f"--seeds={args.seeds} must be >= 1")
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--ratios={args.ratios!r}: expected comma-separated numbers such as 0,1,2,3")
    if any(r < 0 for r in ratios):
        ap.error(f"--ratios={args.ratios!r}: ratios must be >= 0")
    if args.mixing not in ("rows", "batches"):
        ap.error(f"--mixing={args.mixing!r} is not allowed; allowed: ['rows', 'batches']")
    if args.base is not None and not os.path.isdir(os.path.join(args.base, "checkpoints")):
        ap.error(f"--base={args.base!r} has no checkpoints/ directory (train a base first or drop --base)")
    if args.eval:
        from sgt_jax.config import ConfigError, default_config, parse_assignments, set_fields

        try:  # the same fields tools/evaluate.py takes as --config.eval.umm.FIELD=VALUE
            set_fields(default_config(), {f"eval.umm.{k.removeprefix('eval.umm.')}": v
                                          for item in args.eval for k, v in parse_assignments(item).items()})
        except ConfigError as e:
            ap.error(f"--eval: {e}")
    args.rows, args.ratios = rows, ratios
    return args


def main(argv: Sequence[str] | None = None, runner: Callable[[list[str]], int] | None = None) -> int:
    args = parse_args(argv)
    out, work = os.path.abspath(args.out), os.path.abspath(args.work)
    plan = make_plan(work, args.profile, rows=args.rows, seeds=args.seeds, ratios=args.ratios,
                     equal_vqa=args.equal_vqa, mixing=args.mixing, base=args.base, eval_overrides=args.eval)
    if args.dry_run:
        for s in plan.stages:
            print(f"{s.name}: {' '.join(s.argv[1:])}")
        return 0
    os.makedirs(work, exist_ok=True)
    restored = restore_finished(work, out, plan.stages)
    if restored:
        print(f"[ablation] restored {len(restored)} finished stage(s) from {out}: {', '.join(restored)}")
    if not args.report_only:
        run_stages(work, plan.stages, runner)
    command = [os.path.relpath(sys.argv[0], ROOT) if argv is None else "tools/ablation.py",
               *(sys.argv[1:] if argv is None else argv)]
    fallback = provenance.git_commit()
    if os.path.exists(os.path.join(out, "manifest.json")):  # markers from before they recorded commits
        with open(os.path.join(out, "manifest.json")) as f:
            previous = json.load(f)
        fallback = previous.get("stages_commit") or previous.get("commit") or fallback
    timings, stages_commit = finished_stages(work, plan.stages, fallback)
    text = write_results(out, plan, command, timings, args.profile, args.mixing, args.seeds, work, stages_commit)
    print("\n" + text)
    print(f"[ablation] wrote {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
