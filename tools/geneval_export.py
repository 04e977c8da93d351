"""Export a UMM run's text-to-image samples for GenEval's official scorer.

  python tools/geneval_export.py --workdir=runs/sgt_1b \
      --metadata=geneval/prompts/evaluation_metadata.jsonl --outdir=runs/sgt_1b/geneval \
      [--n_samples=4 --guidance_scale=5 --temperature=1 --top_k=0 --seed=0 --limit=0]
  # then, in a GenEval checkout:
  python evaluation/evaluate_images.py runs/sgt_1b/geneval --outfile results.jsonl --model-path MODELS
  python evaluation/summary_scores.py results.jsonl

Writes <outdir>/<index:05d>/metadata.jsonl + samples/<k:05d>.png and <outdir>/sampling.json (the
sampling settings). Re-running resumes: complete prompt folders are kept.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "UMM run directory (checkpoints/).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = latest).")
_METADATA = flags.DEFINE_string("metadata", None, "GenEval's evaluation_metadata.jsonl.")
_OUTDIR = flags.DEFINE_string("outdir", None, "Where the GenEval folders go.")
_N = flags.DEFINE_integer("n_samples", 4, "Images per prompt (GenEval: 4).")
_CFG = flags.DEFINE_float("guidance_scale", 5.0, "Classifier-free guidance scale (1 = off).")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOPK = flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
_TOPP = flags.DEFINE_float("top_p", 1.0, "Top-p filter (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed; each prompt's samples use fold_in(seed, index).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Export only the first N prompts (0 = all 553).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where the run's tokenizer lives (default: the run's).")
flags.mark_flags_as_required(["workdir", "metadata", "outdir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sgt_jax.eval import geneval_export

    problems = []
    if not os.path.isfile(_METADATA.value):
        problems.append(f"--metadata={_METADATA.value!r} is not a file (GenEval's evaluation_metadata.jsonl)")
    if _N.value <= 0:
        problems.append(f"--n_samples={_N.value} is not allowed; allowed: >= 1")
    if _TEMP.value < 0 or _TOPK.value < 0 or not 0 < _TOPP.value <= 1 or _LIMIT.value < 0:
        problems.append(f"sampling flags temperature={_TEMP.value}, top_k={_TOPK.value}, top_p={_TOPP.value}, "
                        f"limit={_LIMIT.value}: allowed temperature >= 0, top_k >= 0, 0 < top_p <= 1, limit >= 0")
    if problems:
        for p in problems:
            logging.error("%s", p)
        return 2
    try:
        metas = geneval_export.read_metadata(_METADATA.value)
    except ValueError as e:
        logging.error("%s", e)
        return 2
    from sgt_jax.eval.umm_run import UMMRun
    from sgt_jax.infer.sampler import SamplingConfig
    from sgt_jax.train import restore

    if restore.saved_stage(os.path.abspath(_WORKDIR.value), _STEP.value) != "umm":
        logging.error("--workdir=%r holds no UMM checkpoint", _WORKDIR.value)
        return 2
    run = UMMRun.from_workdir(os.path.abspath(_WORKDIR.value), step=_STEP.value,
                                       data_dir=_DATA_DIR.value or None)
    sampling = SamplingConfig(guidance_scale=_CFG.value, temperature=_TEMP.value, top_k=_TOPK.value,
                              top_p=_TOPP.value, seed=_SEED.value)
    indices = range(min(len(metas), _LIMIT.value)) if _LIMIT.value else None
    summary = geneval_export.export(run, metas, _OUTDIR.value, sampling=sampling, n_samples=_N.value,
                                    indices=indices)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
