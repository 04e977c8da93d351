"""Segmentation scores for generated (or VQ-reconstructed) masks against Shapes World ground truth.

Instance mIoU (the headline number): the mean over *ground-truth instances* of the IoU between the
true instance mask and the predicted mask of the same id. Ids are matched directly (`match="id"`)
because the SGT palette is deterministic (instance k = k-th farthest object), so getting the colour
right is part of the task; `match="hungarian"` gives the permutation-invariant variant (best one-to-one
assignment), which isolates mask quality. Every object counts once whatever its size, so small objects
weigh as much as large ones. Background is excluded from `miou` and reported as `background_iou`.
Pooling over a dataset (`aggregate`) averages over all instances of all images.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def pixel_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Fraction of pixels whose label (instance or class id) is exactly right."""
    pred, true = np.asarray(pred), np.asarray(true)
    return float((pred == true).mean())


def instance_miou(pred_instance: np.ndarray, true_instance: np.ndarray, match: str = "id") -> dict:
    """Per-image instance scores: dict(miou, ious (per true instance, in id order), background_iou,
    pixel_accuracy, num_instances). An image with no true instances has miou = nan."""
    pred, true = np.asarray(pred_instance), np.asarray(true_instance)
    if pred.shape != true.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs true {true.shape}")
    true_ids = [int(i) for i in np.unique(true) if i != 0]
    if match == "id":
        ious = [_iou(pred == k, true == k) for k in true_ids]
        mapping = {k: k for k in true_ids}
    elif match == "hungarian":
        pred_ids = [int(i) for i in np.unique(pred) if i != 0]
        m = np.array([[_iou(pred == p, true == t) for p in pred_ids] for t in true_ids]).reshape(
            len(true_ids), len(pred_ids))
        rows, cols = linear_sum_assignment(-m) if m.size else ([], [])
        best = dict(zip(rows, cols, strict=True))
        ious = [float(m[i, best[i]]) if i in best else 0.0 for i in range(len(true_ids))]
        mapping = {t: pred_ids[best[i]] for i, t in enumerate(true_ids) if i in best}
    else:
        raise ValueError(f"match must be 'id' or 'hungarian', got {match!r}")
    return {
        "miou": float(np.mean(ious)) if ious else float("nan"),
        "ious": ious,
        "background_iou": _iou(pred == 0, true == 0),
        "pixel_accuracy": pixel_accuracy(pred, true),
        "num_instances": len(true_ids),
        "mapping": mapping,
    }


def semantic_miou(pred_semantic: np.ndarray, true_semantic: np.ndarray) -> dict:
    """Per-image class IoUs over classes present in the truth (background excluded, reported apart)."""
    pred, true = np.asarray(pred_semantic), np.asarray(true_semantic)
    classes = [int(c) for c in np.unique(true) if c != 0]
    ious = {c: _iou(pred == c, true == c) for c in classes}
    return {"miou": float(np.mean(list(ious.values()))) if ious else float("nan"), "ious": ious,
            "background_iou": _iou(pred == 0, true == 0), "pixel_accuracy": pixel_accuracy(pred, true)}


def aggregate(results: Iterable[Mapping]) -> dict:
    """Pool per-image results: miou over all instances, mean background IoU and pixel accuracy."""
    results = list(results)
    ious = [v for r in results for v in (r["ious"].values() if isinstance(r["ious"], Mapping) else r["ious"])]
    return {
        "miou": float(np.mean(ious)) if ious else float("nan"),
        "background_iou": float(np.mean([r["background_iou"] for r in results])) if results else float("nan"),
        "pixel_accuracy": float(np.mean([r["pixel_accuracy"] for r in results])) if results else float("nan"),
        "num_instances": len(ious),
        "num_images": len(results),
    }
