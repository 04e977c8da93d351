"""Does a checkpoint's answer depend on the image at all? The choice log-likelihoods of the CV-Bench
analogue items with the real image against the same items with a flat grey image (the blind control
at the level of the scores, before the argmax hides small effects).

    .venv/bin/python results/base_search/image_sensitivity.py WORKDIR DATA_DIR STEP [PER_TASK]

Prints the mean |log p(choice | image) - log p(choice | grey)| over choices and items, beside the mean
spread of log p across an item's choices (how much the choices differ at all), n items.
"""
import sys

import numpy as np

from sgt_jax.eval import cvbench, umm_run

workdir, data_dir, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
per_task = int(sys.argv[4]) if len(sys.argv) > 4 else 16
run = umm_run.UMMRun.from_workdir(workdir, data_dir=data_dir, step=step)
items = cvbench.mcq_items(run.world, "test", per_task=per_task)
real = cvbench.choice_logprobs(run, items)
blind = cvbench.choice_logprobs(run, [cvbench.blind(it) for it in items])
diff = [float(np.abs(r - b).mean()) for r, b in zip(real, blind, strict=True)]
spread = [float(np.ptp(r)) for r in real]
print(f"step {run.step}: mean |logp(image) - logp(grey)| = {np.mean(diff):.4f} "
      f"(std {np.std(diff):.4f}); mean spread across choices = {np.mean(spread):.3f}; n = {len(items)} items")
