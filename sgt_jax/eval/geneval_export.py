"""Write a run's text-to-image samples in GenEval's folder layout, for the official scorer.

GenEval (github.com/djghosh13/geneval) reads, per prompt, `<outdir>/<index:05d>/metadata.jsonl`
(one JSON object: the prompt's line of `evaluation_metadata.jsonl`, read with `json.load`) and
every `samples/<n>.png` whose name matches `\\d+\\.png`; folders whose name is not all digits are
ignored. We write the samples as `samples/<k:05d>.png` (its own generation script's names), 4 per
prompt by default, and the sampling settings once in `<outdir>/sampling.json` (a file, so the
scorer skips it). Each prompt's samples depend only on (seed, prompt index), so an interrupted
export resumes where it stopped (complete prompt folders are kept) and any subset reproduces.

The Shapes World GenEval analogue (`eval.geneval`, `eval.geneval_eval`) is separate and unchanged.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

SETTINGS_FILE = "sampling.json"


def read_metadata(path: str) -> list[dict]:
    """GenEval's `evaluation_metadata.jsonl`: one JSON object with a `prompt` per line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e})") from e
            if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str) or not meta["prompt"]:
                raise ValueError(f"{path} line {n}: needs a non-empty string field 'prompt', got {line.strip()[:120]!r}")
            out.append(meta)
    if not out:
        raise ValueError(f"{path} has no prompts")
    return out


def _done(folder: str, n_samples: int) -> bool:
    return all(os.path.exists(os.path.join(folder, "samples", f"{k:05d}.png")) for k in range(n_samples))


def export(run, metadatas: Sequence[Mapping[str, Any]], outdir: str, *, sampling, n_samples: int = 4,
           indices: Sequence[int] | None = None) -> dict[str, Any]:
    """Generate `n_samples` images per prompt with `run` (`eval.umm_eval.UMMRun`, CFG pairs from
    `run.t2i_prefixes`) and write them in GenEval's layout; returns a summary."""
    import jax
    from PIL import Image

    if n_samples <= 0:
        raise ValueError(f"n_samples must be > 0, got {n_samples}")
    os.makedirs(outdir, exist_ok=True)
    settings = {**sampling.as_dict(), "seed": int(sampling.seed), "n_samples": int(n_samples),
                "image_size": int(run.builder.layout.image_size), "step": int(run.step), "workdir": run.workdir,
                "prompts": len(metadatas), "seed_rule": "jax.random.fold_in(key(seed), prompt index)"}
    with open(os.path.join(outdir, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=1)
    indices = range(len(metadatas)) if indices is None else indices
    written = skipped = 0
    for index in indices:
        meta = metadatas[index]
        folder = os.path.join(outdir, f"{index:05d}")
        if _done(folder, n_samples):
            skipped += 1
            continue
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            json.dump(dict(meta), f)
        cond, uncond = run.t2i_prefixes([meta["prompt"]] * n_samples)
        rng = jax.random.fold_in(jax.random.key(int(sampling.seed)), int(index))
        images = np.asarray(run.sample_images(cond, uncond, sampling, rng), np.uint8)
        for k, image in enumerate(images[:n_samples]):
            Image.fromarray(image).save(os.path.join(folder, "samples", f"{k:05d}.png"))
        written += 1
    return {"outdir": outdir, "prompts_written": written, "prompts_already_done": skipped,
            "images_per_prompt": n_samples, "settings_file": os.path.join(outdir, SETTINGS_FILE)}
