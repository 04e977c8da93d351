"""Blind constant-answer scores on the CV-Bench analogue's items (pure Python, no model).

    python tools/mcq_baselines.py [--per_task=500] [--splits=test,heldout] [--seed=0]

Prints, per split, the chance rate and the score of "always A" ... "always D", "always the smallest /
largest number", "always the object named first". On the balanced items every row sits at chance
(up to the rounding of quotas that do not divide evenly); a row above chance would be a blind prior.
"""
from __future__ import annotations

import argparse
import sys

from sgt_jax.data import shapes_world as sw
from sgt_jax.data import text
from sgt_jax.eval import cvbench

COLS = (*cvbench.CVBENCH_TASKS, "mean")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per_task", type=int, default=500)
    ap.add_argument("--splits", default="test,heldout")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in sw.SPLITS]
    if bad or not splits:
        ap.error(f"--splits={args.splits!r}: unknown {bad or 'empty'}; allowed: {list(sw.SPLITS)}")
    if args.per_task < 1:
        ap.error(f"--per_task={args.per_task} must be >= 1")
    world = sw.WorldConfig()
    for split in splits:
        items = text.balanced_mcq_items(world, split, args.per_task, args.seed)
        chance = cvbench.score_predictions(items, [0] * len(items))["chance"]
        print(f"split={split}: {len(items)} items ({args.per_task} per task), percent")
        print(f"{'rule':32s}" + "".join(f"{c:>12s}" for c in COLS))
        print(f"{'chance':32s}" + "".join(f"{100 * chance[c]:12.1f}" for c in COLS))
        for rule, row in cvbench.constant_baselines(items).items():
            print(f"{rule:32s}" + "".join(f"{100 * row[c]:12.1f}" for c in COLS))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
