"""Generation-side benchmarks of a UMM: the GenEval analogue and segmentation by SGT inference.

Both sample image codes with the sampler (`sgt_jax.infer.sampler.generate_codes`: static KV cache,
CFG with paired cond/uncond rows) and score the decoded images exactly against Shapes World truth.

* GenEval (`evaluate_geneval`): `text.geneval_prompts` gives a fixed set of prompts per tag (the six
  GenEval tags; the held-out split uses unseen colour x shape pairs for its colour prompts); every
  image is scored 0/1 by the exact detector + GenEval clause logic (`sgt_jax.eval.geneval`); per-tag
  means and `overall` = unweighted mean of the six. The sampling settings are stored with the scores.
  As in GenEval, objects the prompt does not mention are ignored, so noisy images can pass by
  spurious detections; `strict` (exactly the prompted number of detections) and `mean_detections`
  expose that.
* Segmentation (`evaluate_segmentation`): image -> ViT, + a segmentation instruction (drawn from the
  training paraphrases, fixed per scene) -> mask codes -> VQ decode -> nearest instance-palette colour
  -> instance map, scored by `sgt_jax.data.segmentation.instance_miou` against the true instance map
  (ids matched directly, since the palette order is part of the task; the permutation-invariant
  Hungarian variant is reported too). Runs that never trained the proxy score near zero here, which
  is the point of the comparison. `miou_ci` is a bootstrap 95% interval over images, and
  `vq_ceiling_miou` the frozen VQ's reconstruction mIoU of the true masks (the ceiling).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath

from sgt_jax.data import render, segmentation, text
from sgt_jax.data import shapes_world as sw
from sgt_jax.eval import geneval, stats

_SEG_SALT = 0x5347_5345


def _batches(n: int, size: int):
    size = max(1, min(int(size), n))
    for i in range(0, n, size):
        yield i, min(i + size, n), size


def _sample(run, make_prefixes, jobs: Sequence[Any], sampling, seed: int, batch_size: int, salt: int) -> np.ndarray:
    """Generate one image per job in fixed-size batches (last batch padded) with per-batch keys."""
    images = []
    key = jax.random.fold_in(jax.random.key(int(seed)), salt)
    for b, (lo, hi, size) in enumerate(_batches(len(jobs), batch_size)):
        chunk = list(jobs[lo:hi])
        chunk += [chunk[-1]] * (size - len(chunk))
        cond, uncond = make_prefixes(chunk)
        images.append(run.sample_images(cond, uncond, sampling, jax.random.fold_in(key, b))[: hi - lo])
    return np.concatenate(images, axis=0)


def save_grid(images: Sequence[np.ndarray], path: str, columns: int = 8) -> str:
    """A PNG contact sheet of uint8 images (1 px gaps), for the report."""
    from PIL import Image

    images = [np.asarray(im, np.uint8) for im in images]
    h, w = images[0].shape[:2]
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    sheet = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        sheet[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = im[..., :3]
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)  # epath: gs:// as well as local
    with epath.Path(path).open("wb") as f:
        Image.fromarray(sheet).save(f, format="PNG")
    return path


def evaluate_geneval(run, world: sw.WorldConfig, split: str, *, prompts_per_tag: int, images_per_prompt: int = 1,
                     sampling, seed: int = 0, batch_size: int = 16, sample_dir: str | None = None) -> dict[str, Any]:
    """GenEval analogue on one split: {<tag>: score, overall, num_prompts, num_images, sampling,
    failures (a few reasons), samples (file name of the sample grid in `sample_dir`)}."""
    specs = text.geneval_prompts(int(prompts_per_tag), seed=int(seed), cfg=world, split=split)
    jobs = [spec for spec in specs for _ in range(int(images_per_prompt))]
    images = _sample(run, lambda chunk: run.t2i_prefixes([s["prompt"] for s in chunk]), jobs, sampling, seed,
                     batch_size, salt=sw.SPLITS.index(split))
    results = [geneval.evaluate_image(img, spec) for img, spec in zip(images, jobs, strict=True)]
    out: dict[str, Any] = geneval.score(results, intervals=True)
    # GenEval's clauses ignore extra objects, so a cluttered or noisy image can pass "a photo of a
    # circle". `strict` also requires exactly the prompted number of detections (a diagnostic).
    wanted = [sum(int(r["count"]) for r in spec["include"]) for spec in jobs]
    strict = [{"tag": r["tag"], "correct": r["correct"] and len(r["detections"]) == n} for r, n in zip(results, wanted, strict=True)]
    out["strict"] = geneval.score(strict, intervals=True)
    out["per_image"] = {"tag": [r["tag"] for r in results], "correct": [bool(r["correct"]) for r in results],
                        "strict": [bool(r["correct"]) for r in strict]}
    out["mean_detections"] = float(np.mean([len(r["detections"]) for r in results]))
    out["mean_prompted_objects"] = float(np.mean(wanted))
    out.update(num_prompts=len(specs), num_images=len(jobs), images_per_prompt=int(images_per_prompt),
               sampling=sampling.as_dict(),
               failures=[{"prompt": s["prompt"], "reason": r["reason"]}
                         for s, r in zip(jobs, results, strict=True) if not r["correct"]][:6])
    if sample_dir:  # rows = tags, columns = the first prompts of each tag (their first image)
        ppt, ipp, cols = int(prompts_per_tag), int(images_per_prompt), min(8, int(prompts_per_tag))
        picks = [images[(t * ppt + i) * ipp] for t in range(len(geneval.TAGS)) for i in range(cols)]
        out["samples"] = os.path.basename(save_grid(picks, os.path.join(sample_dir, f"geneval_{split}.png"),
                                                    columns=cols))
    return out


def vq_ceiling(run, scenes: Sequence[dict], batch_size: int = 16) -> dict[str, Any]:
    """The frozen VQ's own reconstruction mIoU of the true instance masks (rendered as in training,
    encoded, decoded, snapped to the palette): the best mIoU any generated mask can reach through
    this tokenizer."""
    rgb = np.stack([render.instance_to_rgb(s["instance"]) for s in scenes]).astype(np.uint8)
    decoded = []
    for lo, hi, size in _batches(len(rgb), batch_size):
        chunk = rgb[lo:hi]
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
        decoded.append(run.decode_codes(run.encode_images(chunk))[: hi - lo])
    rec = np.concatenate(decoded)
    per = [segmentation.instance_miou(render.rgb_to_instance(r), np.asarray(s["instance"]), "id")
           for r, s in zip(rec, scenes, strict=True)]
    return segmentation.aggregate(per)


def evaluate_segmentation(run, world: sw.WorldConfig, split: str, *, num_images: int, sampling, seed: int = 0,
                          batch_size: int = 16, sample_dir: str | None = None) -> dict[str, Any]:
    """Instance mIoU of masks generated by SGT inference on scenes 0..num_images-1 of `split`."""
    instructions = text.INSTRUCTIONS["segmentation"]
    jobs = []
    for i in range(int(num_images)):
        scene = sw.generate_scene(i, world, split)
        rng = np.random.default_rng([_SEG_SALT, int(seed), sw.SPLITS.index(split), i])
        jobs.append((scene, instructions[int(rng.integers(len(instructions)))]))
    masks = _sample(run, lambda chunk: run.proxy_prefixes([s["image"] for s, _ in chunk], [t for _, t in chunk]),
                    jobs, sampling, seed, batch_size, salt=100 + sw.SPLITS.index(split))
    by_id, by_match = [], []
    for rgb, (scene, _) in zip(masks, jobs, strict=True):
        true = np.asarray(scene["instance"])
        pred = render.rgb_to_instance(rgb)
        if pred.shape != true.shape:
            raise ValueError(f"generated mask {pred.shape} vs true instance map {true.shape}: the VQ image size "
                             "must equal the scene size")
        by_id.append(segmentation.instance_miou(pred, true, "id"))
        by_match.append(segmentation.instance_miou(pred, true, "hungarian"))
    agg, agg_h = segmentation.aggregate(by_id), segmentation.aggregate(by_match)
    ceiling = vq_ceiling(run, [s for s, _ in jobs], batch_size)
    boot = stats.bootstrap_mean([r["ious"] for r in by_id], seed=int(seed))
    out: dict[str, Any] = {"miou": agg["miou"], "miou_ci": [boot["lo"], boot["hi"]], "miou_hungarian": agg_h["miou"],
                           "background_iou": agg["background_iou"], "pixel_accuracy": agg["pixel_accuracy"],
                           "num_images": agg["num_images"], "num_instances": agg["num_instances"],
                           "vq_ceiling_miou": ceiling["miou"], "sampling": sampling.as_dict(),
                           # per image: mean IoU of its instances (paired comparisons between runs)
                           "per_image_miou": [r["miou"] for r in by_id]}
    if sample_dir:
        k = min(8, len(jobs))
        truth = [render.instance_to_rgb(s["instance"]) for s, _ in jobs[:k]]
        out["samples"] = os.path.basename(save_grid([s["image"] for s, _ in jobs[:k]] + truth + list(masks[:k]),
                                                    os.path.join(sample_dir, f"segmentation_{split}.png"), columns=k))
    return out
