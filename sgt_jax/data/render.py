"""Proxy-task targets as RGB images the VQ tokenizer can encode, and their inverses.

Why fixed palettes: the SGT target must be a deterministic function of the input image, otherwise
the generator is asked to guess arbitrary colours (SegGPT-style random palettes). Instance k (the
k-th object painted, i.e. ordered far -> near by depth) always gets `INSTANCE_PALETTE[k]`; class c
always gets `SEMANTIC_PALETTE[c + 1]`; background is black in both. Palette colours are at least 127
apart (RGB L2), so nearest-colour decoding survives VQ blur (Painter's decoding rule).

Targets per proxy (`render_target(scene, proxy, rng) -> (input_rgb, target_rgb)`):
  segmentation    instance colours                       input = scene image
  semantic        class colours                          input = scene image
  depth           grey 255 (nearest) .. 56 (farthest) by depth level; background black
  edge            white instance boundaries on black
  reconstruction  the image itself
  mae             input = image with ~50% of the patches (patch = image_size // 8) filled with mid grey;
                  target = the full image
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sgt_jax.config import PROXIES, ConfigError, comma_items
from sgt_jax.data.shapes_world import INSTANCE_PALETTE_SIZE, SHAPES

# What the VQ tokenizer trains on (`model.vq.target_mix`): scene photos and every proxy rendering
# except mae (its target is the photo itself).
VQ_TARGET_KINDS: tuple[str, ...] = ("reconstruction", "segmentation", "semantic", "depth", "edge")
MASK_KINDS: tuple[str, ...] = ("segmentation", "semantic")  # flat palette maps

INSTANCE_PALETTE = np.array([
    (0, 0, 0),  # background
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 255),
    (255, 128, 0), (128, 0, 255), (0, 128, 255), (0, 255, 128), (255, 0, 128), (128, 255, 0),
    (128, 128, 128), (255, 128, 255),
], np.uint8)
assert len(INSTANCE_PALETTE) == INSTANCE_PALETTE_SIZE
# Class colours: the same well-separated set, in an order that does not mirror the instance ids.
SEMANTIC_PALETTE = INSTANCE_PALETTE[[0, 8, 2, 10, 4, 12, 6, 14, 1][: len(SHAPES) + 1]]
_DEPTH_SPAN = 200.0  # grey levels spanned by object depths
_DEPTH_BG_CUT = 28.0  # decoded greys below this are background
MAE_PATCH_FRACTION = 8  # patch size = image_size // 8
MAE_MASK_RATIO = 0.5
MAE_FILL = 128


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, np.int32)
    d = ((rgb[..., None, :] - palette.astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1).astype(np.uint8)


def instance_to_rgb(instance: np.ndarray) -> np.ndarray:
    return INSTANCE_PALETTE[np.asarray(instance)]


def semantic_to_rgb(semantic: np.ndarray) -> np.ndarray:
    return SEMANTIC_PALETTE[np.asarray(semantic)]


def rgb_to_instance(rgb: np.ndarray) -> np.ndarray:
    """uint8[..., 3] -> instance ids by nearest `INSTANCE_PALETTE` colour (0 = background)."""
    return _nearest(rgb, INSTANCE_PALETTE)


def rgb_to_semantic(rgb: np.ndarray) -> np.ndarray:
    """uint8[..., 3] -> semantic ids by nearest `SEMANTIC_PALETTE` colour (0 = background, c+1 = SHAPES[c])."""
    return _nearest(rgb, SEMANTIC_PALETTE)


def depth_to_rgb(depth: np.ndarray) -> np.ndarray:
    """Objects grey by nearness, 255 (nearest) down to 56 (farthest); background black, so even the
    farthest object stays well apart from the background."""
    d = np.asarray(depth, np.float32)
    g = np.where(d >= 255, 0, np.rint(255 - d * _DEPTH_SPAN / 255))
    return np.repeat(g.astype(np.uint8)[..., None], 3, -1)


def rgb_to_depth(rgb: np.ndarray) -> np.ndarray:
    """Inverse of `depth_to_rgb` (channel mean) back to the depth-map convention, exact to +-1 level."""
    g = np.asarray(rgb, np.float32).mean(-1)
    d = np.clip(np.rint((255 - g) * 255 / _DEPTH_SPAN), 0, 254)
    return np.where(g < _DEPTH_BG_CUT, 255, d).astype(np.uint8)


def edges_to_rgb(edges: np.ndarray) -> np.ndarray:
    return np.repeat((np.asarray(edges, np.uint8) * 255)[..., None], 3, -1)


def rgb_to_edges(rgb: np.ndarray) -> np.ndarray:
    return (np.asarray(rgb, np.float32).mean(-1) >= 128).astype(np.uint8)


def mae_mask(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """bool[H, W], True on masked patches (exactly round(ratio * patches) of them)."""
    p = max(1, image_size // MAE_PATCH_FRACTION)
    g = -(-image_size // p)
    flat = np.zeros(g * g, bool)
    flat[rng.permutation(g * g)[: int(round(MAE_MASK_RATIO * g * g))]] = True
    grid = flat.reshape(g, g)
    return np.kron(grid, np.ones((p, p), bool))[:image_size, :image_size]


def render_target(scene: Mapping[str, Any], proxy: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(input_rgb, target_rgb), both uint8[H, W, 3], for one proxy; `rng` is used by "mae" only."""
    image = np.asarray(scene["image"], np.uint8)
    if proxy == "segmentation":
        return image, instance_to_rgb(scene["instance"])
    if proxy == "semantic":
        return image, semantic_to_rgb(scene["semantic"])
    if proxy == "depth":
        return image, depth_to_rgb(scene["depth"])
    if proxy == "edge":
        return image, edges_to_rgb(scene["edges"])
    if proxy == "reconstruction":
        return image, image.copy()
    if proxy == "mae":
        m = mae_mask(image.shape[0], rng)
        masked = image.copy()
        masked[m] = MAE_FILL
        return masked, image.copy()
    raise ValueError(f"unknown proxy {proxy!r}; allowed: {list(PROXIES)}")


def parse_target_mix(text: str) -> dict[str, float]:
    """`model.vq.target_mix` "kind:weight,..." -> {kind: probability}; kinds from VQ_TARGET_KINDS,
    weights finite and > 0. Raises ConfigError naming the field (sgt_jax/checks.py runs it first)."""
    field = "config field 'model.vq.target_mix'"
    out: dict[str, float] = {}
    for kind, _, weight in comma_items(str(text), ":"):
        if kind not in VQ_TARGET_KINDS:
            raise ConfigError(f"{field} = {text!r} names {kind!r}; allowed: {list(VQ_TARGET_KINDS)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"{field} = {text!r}: weight {weight!r} of {kind!r} is not a number") from None
        if not np.isfinite(w) or w <= 0:
            raise ConfigError(f"{field} = {text!r} gives {kind!r} weight {w}; allowed: a finite number > 0")
        out[kind] = w
    if not out:
        raise ConfigError(f"{field} = {text!r} names no kind; allowed: 'kind:weight,...' over {list(VQ_TARGET_KINDS)}")
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def check_config(cfg) -> None:
    """Rules of the rendered VQ targets (listed in sgt_jax/checks.py)."""
    parse_target_mix(cfg.model.vq.target_mix)
