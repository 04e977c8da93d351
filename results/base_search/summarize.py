"""Table of the learning curve: CV-Bench analogue accuracy per task at each checkpoint."""
import glob
import json
import sys

TASKS = ("count", "relation", "depth_order", "distance")
rows = []
for f in glob.glob(sys.argv[1] if len(sys.argv) > 1 else "results/base_search/eval_1200_*.json"):
    d = json.load(open(f))
    c = d["splits"]["test"]["cvbench"]
    rows.append((int(d["step"]), c))
rows.sort(key=lambda r: r[0])
print("| step | " + " | ".join(f"{t} acc [95% CI] (chance; blind; circular)" for t in TASKS) + " |")
print("|---:|" + "---|" * len(TASKS))
for step, c in rows:
    cells = []
    for t in TASKS:
        lo, hi = c["ci"][t]
        cells.append(f"{100*c[t]:.1f} [{100*lo:.1f}, {100*hi:.1f}] ({100*c['chance'][t]:.1f}; "
                     f"{100*c['blind'][t]:.1f}; {100*c['circular'][t]:.1f}) n={c['n'][t]}")
    print(f"| {step} | " + " | ".join(cells) + " |")
