"""Proxy ablation on Shapes World: every SGT proxy (and SFT only) x 3 seeds, from one base run.

Not part of `make demo` (21 post-training runs). Each sweep point is an ordinary post_shapes config
with its own seed (train rng and data order), so one point can be trained by hand:

    python tools/train.py --config=configs/ablation_shapes.py:proxy=depth,seed=1 --workdir=runs/ablation/depth_s1

and the whole sweep (train -> evaluate -> mean +- std table) runs, resumably, with

    python configs/ablation_shapes.py --base=runs/base --out=runs/ablation [--seeds=3] [--steps=N]
        [--proxies=segmentation,none] [--smoke] [--dry_run] [--eval=eval.umm.mcq_items=64 ...]

Finished trainings (a checkpoint at the last step) and evaluations (eval/metrics.json) are skipped
on re-runs. The table (`<out>/ablation.md`) has one row per proxy with mean +- std over seeds.

Options of get_config (OPTIONS: configs/post_shapes.py's plus `seed`): `proxy=NAME` (segmentation |
semantic | depth | edge | reconstruction | mae | none), `seed=S`, `base=PATH`, `steps=N`, `ratio=R`,
`smoke`, `vqarg=A`. `--eval` sets `eval.umm` fields of every sweep point (saved with the run, so its
evaluation reads them).
"""
from __future__ import annotations

import ast
import copy
import os
import sys

from sgt_jax.config import PROXIES, config_module, format_arg, parse_arg, set_fields

ABLATION_PROXIES: tuple[str, ...] = PROXIES + ("none",)
NUM_SEEDS = 3


def _post_shapes():
    return config_module("post_shapes.py", __file__)


def get_config(arg=None):
    """One sweep point: post_shapes(proxy) with `seed` setting the train rng and the data order."""
    post = _post_shapes()
    a = parse_arg(arg, seed=0, **post.OPTIONS)
    c = post.get_config(format_arg({k: v for k, v in a.items() if k != "seed"}, post.OPTIONS))
    c.seed = a.seed
    c.data.shuffle_seed = a.seed
    return c


def sweep(base: str = "runs/base", *, seeds: int = NUM_SEEDS, proxies=ABLATION_PROXIES, steps: int | None = None,
          smoke: bool = False) -> list[dict]:
    """The sweep as a list of {name, proxy, seed, arg, config}: every proxy x seeds 0..seeds-1."""
    out = []
    for proxy in proxies:
        for seed in range(int(seeds)):
            parts = [f"proxy={proxy}", f"seed={seed}", f"base={base}"]
            if steps is not None:
                parts.append(f"steps={int(steps)}")
            if smoke:
                parts.append("smoke")
            arg = ",".join(parts)
            out.append({"name": f"{proxy}_s{seed}", "proxy": proxy, "seed": seed, "arg": arg,
                        "config": get_config(arg)})
    return out


def _finished(workdir: str, steps: int) -> bool:
    ckpt = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt):
        return False
    done = [int(d) for d in os.listdir(ckpt) if d.isdigit()]
    return bool(done) and max(done) >= steps


def run_sweep(base: str, out: str, *, seeds: int = NUM_SEEDS, proxies=ABLATION_PROXIES, steps: int | None = None,
              smoke: bool = False, eval_overrides: dict | None = None, dry_run: bool = False) -> str:
    """Train (in this process, one run after another), evaluate, and write `<out>/ablation.md`.
    Returns the markdown table (or the plan when `dry_run`)."""
    points = sweep(base, seeds=seeds, proxies=proxies, steps=steps, smoke=smoke)
    if dry_run:
        return "\n".join(f"{p['name']}: tools/train.py --config=configs/ablation_shapes.py:{p['arg']} "
                         f"--workdir={os.path.join(out, p['name'])}" for p in points)
    from sgt_jax import checks
    from sgt_jax.eval import report, umm_eval
    from sgt_jax.eval.umm_results import METRICS_FILE
    from sgt_jax.train import loop

    groups: dict[str, list[str]] = {}
    for p in points:
        workdir = os.path.join(out, p["name"])
        cfg = set_fields(p["config"], eval_overrides or {})
        steps = int(checks.prepare(copy.deepcopy(cfg)).train.steps)
        if not _finished(workdir, steps):
            print(f"[ablation] training {p['name']} ({steps} steps) -> {workdir}", flush=True)
            code = loop.run(cfg, workdir)
            if code:
                raise SystemExit(f"training {p['name']} failed with exit code {code}")
        if not os.path.exists(os.path.join(workdir, METRICS_FILE)):
            print(f"[ablation] evaluating {p['name']}", flush=True)
            umm_eval.evaluate_workdir(workdir, show=False)
        groups.setdefault(p["proxy"], []).append(workdir)
    path = os.path.join(out, "ablation.md")
    md = report.write_ablation_report(groups, path)
    print(md)
    print(f"[ablation] wrote {path}")
    return md


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="runs/base", help="base UMM workdir (stage 1)")
    ap.add_argument("--out", default="runs/ablation", help="directory for the sweep's workdirs and table")
    ap.add_argument("--seeds", type=int, default=NUM_SEEDS)
    ap.add_argument("--proxies", default=",".join(ABLATION_PROXIES))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--dry_run", action="store_true", help="print the plan only")
    ap.add_argument("--eval", nargs="*", default=[], help="eval.umm.FIELD=VALUE for every sweep point")
    args = ap.parse_args(argv)
    proxies = tuple(p.strip() for p in args.proxies.split(",") if p.strip())
    bad = [p for p in proxies if p not in ABLATION_PROXIES]
    if bad:
        ap.error(f"--proxies: unknown {bad}; allowed: {list(ABLATION_PROXIES)}")
    evals = {}
    for item in args.eval:
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("eval.umm."):
            ap.error(f"--eval {item!r}: expected eval.umm.FIELD=VALUE")
        try:
            evals[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            evals[key] = value
    print(run_sweep(args.base, args.out, seeds=args.seeds, proxies=proxies, steps=args.steps, smoke=args.smoke,
                    eval_overrides=evals, dry_run=args.dry_run))


if __name__ == "__main__":
    sys.exit(main())
