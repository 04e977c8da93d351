"""VQ tokenizer evaluation on a Shapes World split: what the later stages rely on.

- `psnr`: photos through encode -> decode (8-bit, mean over images).
- Instance masks (the SGT segmentation target): decode the palette rendering, snap every pixel to
  the nearest palette colour (`render.rgb_to_instance`) and score against the true instance map:
  `miou` over all ground-truth instances (every size counts once), `pixel_accuracy`, plus
  `miou_small` (instances under 64 visible pixels) to show where the codes run out.
- `semantic_miou` the same way for class masks; `mse/<kind>` per rendering kind.
- `usage`: fraction of the codebook used by all test renderings (photos + every proxy kind).
Writes `metrics.json` and `recon_grid.png` (rows: original, reconstruction, per kind) to `out_dir`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sgt_jax.data import pipeline
from sgt_jax.data.render import render_target, rgb_to_instance, rgb_to_semantic
from sgt_jax.data.segmentation import aggregate, instance_miou, semantic_miou
from sgt_jax.models import vq as vq_lib

KINDS = ("reconstruction", "segmentation", "semantic", "depth", "edge")
SMALL_PIXELS = 64


class EvalTransform:
    """record -> every rendering kind + the true maps (picklable for grain)."""

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:

        out = {kind: render_target(record, kind, rng)[1] for kind in KINDS}
        out["instance"] = np.asarray(record["instance"], np.uint8)
        out["semantic_map"] = np.asarray(record["semantic"], np.uint8)
        return out


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels (round to nearest)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images [B, H, W, C]."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def test_batches(cfg, split: str, num_examples: int, batch_size: int = 64):
    """Ordered batches of EvalTransform outputs from the built dataset split (no TensorFlow)."""

    batch_size = max(1, min(batch_size, num_examples))
    it = pipeline.make_iterator(cfg, split, EvalTransform(), process_index=0, process_count=1,
                                seed=int(cfg.data.shuffle_seed), batch_size=batch_size, training=False)
    seen = 0
    for batch in it:
        if seen >= num_examples:
            break
        take = min(batch_size, num_examples - seen)
        yield {k: np.asarray(v)[:take] for k, v in batch.items()}
        seen += take


def evaluate_batches(model: vq_lib.VQModel, params: Any, batches) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Score an iterable of EvalTransform batches. Returns (metrics, a few examples for the grid)."""

    enc = jax.jit(lambda p, x: vq_lib.encode(model, p, x))
    dec = jax.jit(lambda p, c: vq_lib.decode(model, p, c))
    used = np.zeros((model.spec.codebook_size,), bool)
    psnrs, inst, sem, small = [], [], [], []
    sq_err: dict[str, list[float]] = {k: [] for k in KINDS}
    grid: dict[str, np.ndarray] = {}
    for batch in batches:
        for kind in KINDS:
            x = batch[kind]
            codes = enc(params, jnp.asarray(x, jnp.float32) / 127.5 - 1.0)
            used[np.asarray(codes).reshape(-1)] = True
            y = to_uint8(dec(params, codes))
            sq_err[kind].extend(np.mean((y.astype(np.float64) - x) ** 2, axis=(1, 2, 3)) / 255.0 ** 2)
            if kind not in grid:
                grid[kind] = np.stack([x[:8], y[:8]])
            if kind == "reconstruction":
                psnrs.extend(psnr(x, y))
            elif kind == "segmentation":
                for pred_rgb, true in zip(y, batch["instance"], strict=True):
                    r = instance_miou(rgb_to_instance(pred_rgb), true)
                    inst.append(r)
                    areas = [int((true == k).sum()) for k in np.unique(true) if k != 0]
                    small.extend(iou for iou, a in zip(r["ious"], areas, strict=True) if a < SMALL_PIXELS)
            elif kind == "semantic":
                for pred_rgb, true in zip(y, batch["semantic_map"], strict=True):
                    sem.append(semantic_miou(rgb_to_semantic(pred_rgb), true))
    if not inst:
        raise ValueError("no evaluation examples: is the split empty or eval.num_examples 0?")
    agg = aggregate(inst)
    metrics = {
        "miou": agg["miou"], "pixel_accuracy": agg["pixel_accuracy"], "background_iou": agg["background_iou"],
        "miou_small": float(np.mean(small)) if small else float("nan"), "num_instances": agg["num_instances"],
        "num_small_instances": len(small), "num_images": agg["num_images"],
        "semantic_miou": aggregate(sem)["miou"], "psnr": float(np.mean(psnrs)),
        "usage": float(used.mean()), "codes_used": int(used.sum()),
    }
    metrics.update({f"mse/{k}": float(np.mean(v)) for k, v in sq_err.items()})
    return metrics, grid


def save_grid(grid: dict[str, np.ndarray], path: str) -> None:
    """PNG: for each kind two rows (originals, reconstructions) of up to 8 images, 2 px gutters."""
    from PIL import Image

    rows = [r for kind in KINDS if kind in grid for r in grid[kind]]
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + 2), n * (w + 2), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = img
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)  # epath: gs:// as well as local
    with epath.Path(path).open("wb") as f:
        Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(f, format="PNG")


def evaluate(cfg, params: Any, *, out_dir: str, step: int | None = None, split: str | None = None,
             num_examples: int | None = None) -> dict[str, Any]:
    """Full VQ evaluation of unboxed `params` on `cfg.eval.split`; writes metrics.json + recon_grid.png."""
    model = vq_lib.VQModel(vq_lib.spec_from_config(cfg), jnp.float32)
    split = split or cfg.eval.split
    n = int(num_examples if num_examples is not None else cfg.eval.num_examples)
    metrics, grid = evaluate_batches(model, params, test_batches(cfg, split, n))
    metrics.update({"split": split, "step": -1 if step is None else int(step)})
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    epath.Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    save_grid(grid, os.path.join(out_dir, "recon_grid.png"))
    return metrics
