"""Shapes World: procedural scenes with exact ground truth, deterministic from (split, seed).

Why a synthetic world: every benchmark of the paper (CV-Bench, GenEval, segmentation) can be scored
*exactly* here, with no detector or judge model, so the SGT effect can be measured on a laptop.

Scene model
-----------
* Objects have a shape class (`SHAPES`), a named colour (`COLORS`, GenEval's colour names), an
  intrinsic size (`SIZES`), a texture (`TEXTURES`) and a depth in (0, 1) (distance from the camera,
  larger = farther). With `perspective`, the drawn size shrinks with depth; with `ground_plane`, farther
  objects sit higher in the frame (with jitter), as on a floor seen from above the horizon.
* Objects are painted far to near, so nearer objects occlude farther ones. `objects` is stored in that
  painting order: instance id k (1-based) = k-th painted = k-th farthest.
* Every object keeps at least `min_visible_fraction` of its area (and `min_visible_pixels` pixels) as one
  4-connected visible piece, and objects of the same colour never touch, so every object is detectable
  by colour + connected components. Within a scene, (colour, shape) pairs are unique, so "the red star"
  always names one object.
* Colours: object colours are >= 80 apart (RGB L2) from each other and from background tones; textures
  perturb a pixel by at most `TEXTURE_RADIUS` and backgrounds by at most `BACKGROUND_RADIUS`, both
  well under half that distance, so nearest-colour quantisation recovers every pixel's colour name.

Coordinates: pixel (row i, column j) covers [j, j+1) x [i, i+1). `bbox` = [x0, y0, x1, y1] in those
continuous coordinates (x1, y1 exclusive, so width = x1 - x0 pixels); `centroid` = mean of the visible
pixels' centres.

Ground-truth maps (uint8[H, W]): `instance` (0 background, k = objects[k-1]); `semantic` (0 background,
c+1 = SHAPES[c]); `depth` (round(255 * depth) of the visible object, 255 = background, i.e. larger =
farther); `edges` (1 where a 4-neighbour has a different instance id, so both sides of every
instance boundary, including object/background boundaries).

Splits: "train", "validation", "test" draw from disjoint seed streams (`SeedSequence([split_id, seed])`)
and never use `HELDOUT_PAIRS`; "heldout" scenes contain at least one held-out colour x shape pair.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping

import numpy as np
from scipy import ndimage

from sgt_jax import config

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "heart", "crescent")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
    "star": "stars", "cross": "crosses", "heart": "hearts", "crescent": "crescents"}
# GenEval's ten colour names; RGB values chosen to be far apart (see module docstring).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (250, 225, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 190),
    "pink": (250, 140, 210),
    "brown": (130, 70, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
# Low-saturation background tones, far from every object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "slate": (112, 124, 142),
    "sand": (150, 140, 118),
    "sage": (118, 140, 122),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Drawn radius (half the larger bbox side, before the class factor) as a fraction of the image size.
SIZE_RADIUS: dict[str, float] = {"small": 0.095, "medium": 0.125, "large": 0.165}
TEXTURES: tuple[str, ...] = ("flat", "stripes", "noise")
BACKGROUND_TEXTURES: tuple[str, ...] = ("plain", "gradient", "stripes", "checker", "noise")
TEXTURE_RADIUS = 28.0  # max RGB L2 offset a texture adds to an object colour
BACKGROUND_RADIUS = 24.0  # max RGB L2 offset of a background pixel from its tone
SPLITS: tuple[str, ...] = ("train", "validation", "test", "heldout")
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}
_SEED_SALT = 0x5347  # keeps world streams apart from other users of SeedSequence([i, seed])

# One held-out colour for each shape (10% of the 80 pairs); no two share a colour.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (tuple(COLORS)[(3 * i + 1) % len(COLORS)], s) for i, s in enumerate(SHAPES))

INSTANCE_PALETTE_SIZE = 16  # render.INSTANCE_PALETTE has 1 background + 15 instance colours


# ---------------------------------------------------------------------------------------------
# shape geometry: each class is an indicator function on its unit box [-1, 1]^2 (y down)
# ---------------------------------------------------------------------------------------------
def _in_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points; one pass per polygon edge."""
    inside = np.zeros(np.broadcast(x, y).shape, bool)
    px, py = poly[:, 0], poly[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    for ax, ay, bx, by in zip(px, py, qx, qy, strict=True):
        crosses = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < xint)
    return inside


def _regular(n: int, radius: float, phase: float) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], -1)


def _star() -> np.ndarray:
    outer = _regular(5, 1.0, -np.pi / 2)
    inner = _regular(5, 0.47, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], 1).reshape(10, 2)


_T = 0.36  # half-width of the cross arms
_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float),
    "triangle": _regular(3, 1.0, -np.pi / 2),
    "diamond": np.array([[0, -1], [0.72, 0], [0, 1], [-0.72, 0]], float),
    "star": _star(),
    "cross": np.array([[-_T, -1], [_T, -1], [_T, -_T], [1, -_T], [1, _T], [_T, _T], [_T, 1], [-_T, 1],
                       [-_T, _T], [-1, _T], [-1, -_T], [-_T, -_T]], float),
}
def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The classic heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, y pointing up (here y points down)."""
    a = x * x + y * y - 1.0
    return a * a * a <= -(x * x) * (y * y * y)


_IMPLICIT: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda x, y: x * x + y * y <= 1.0,
    # classic heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3 with y pointing up
    "heart": lambda x, y: _heart(x, y),
    "crescent": lambda x, y: (x * x + y * y <= 1.0) & ((x - 0.5) ** 2 + (y + 0.12) ** 2 >= 0.78 ** 2),
}
# Per-class factor on the drawn radius so that classes of one size have comparable areas.
_CLASS_SCALE = {"circle": 1.0, "square": 0.88, "triangle": 1.25, "diamond": 1.15, "star": 1.3,
                "cross": 1.05, "heart": 1.05, "crescent": 1.1}


def _raw_fn(shape: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if shape in _POLYGONS:
        poly = _POLYGONS[shape]
        return lambda x, y: _in_polygon(x, y, poly)
    return _IMPLICIT[shape]


def _raw_box(shape: str) -> tuple[float, float, float, float]:
    """Tight box (x0, y0, x1, y1) of a class in its raw coordinates (numeric for implicit shapes)."""
    if shape in _POLYGONS:
        p = _POLYGONS[shape]
        return p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()
    g = np.linspace(-1.6, 1.6, 1601)
    m = _IMPLICIT[shape](g[None, :], g[:, None])
    cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
    return g[cols[0]], g[rows[0]], g[cols[-1]], g[rows[-1]]


def _unit_fn(shape: str) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], float]:
    """Indicator on the unit box (tight box mapped to [-1,1]^2) and the class's width/height ratio."""
    raw = _raw_fn(shape)
    x0, y0, x1, y1 = _raw_box(shape)
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return (lambda u, v: raw(cx + u * hx, cy + v * hy)), hx / hy


_UNIT = {s: _unit_fn(s) for s in SHAPES}


def shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Boolean mask of `shape` fitted exactly into the continuous box (x0, y0, x1, y1), sampled at
    the points (xs, ys); box entries may be arrays that broadcast with the points. The renderer and the detector's template matcher share it."""
    fn = _UNIT[shape][0]
    x0, y0, x1, y1 = box
    u = (xs - (x0 + x1) / 2) / np.maximum((x1 - x0) / 2, 1e-6)
    v = (ys - (y0 + y1) / 2) / np.maximum((y1 - y0) / 2, 1e-6)
    return fn(u, v)


def shape_aspect(shape: str) -> float:
    """Width / height of a class's tight box."""
    return _UNIT[shape][1]


def half_extents(shape: str, radius: float) -> tuple[float, float]:
    """(half width, half height) of a drawn object: the larger side is `radius` x class factor."""
    aspect = _UNIT[shape][1]
    r = radius * _CLASS_SCALE[shape]
    return (r, r / aspect) if aspect >= 1 else (r * aspect, r)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. Frozen and hashable so it can key caches and travel to grain workers."""
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    sizes: tuple[str, ...] = SIZES
    textures: tuple[str, ...] = TEXTURES
    textured_background: bool = True
    perspective: bool = True  # drawn size x lerp(1.15, 0.85, depth)
    ground_plane: bool = True  # farther objects higher in the frame (jittered)
    min_visible_fraction: float = 0.5
    min_visible_pixels: int = 0  # 0 = max(8, 0.004 * image_size^2)
    min_depth_gap: float = 0.03  # distinct objects' depths differ by at least this
    max_tries: int = 200

    def __post_init__(self):
        bad = [s for s in self.shapes if s not in SHAPES] + [c for c in self.colors if c not in COLORS]
        bad += [s for s in self.sizes if s not in SIZES] + [t for t in self.textures if t not in TEXTURES]
        if bad:
            raise ValueError(f"WorldConfig: unknown names {bad}")
        if not 1 <= self.min_objects <= self.max_objects <= INSTANCE_PALETTE_SIZE - 1:
            raise ValueError(f"WorldConfig: need 1 <= min_objects <= max_objects <= {INSTANCE_PALETTE_SIZE - 1}, "
                             f"got {self.min_objects}, {self.max_objects}")
        if self.image_size < 16:
            raise ValueError(f"WorldConfig: image_size must be >= 16, got {self.image_size}")

    @property
    def min_pixels(self) -> int:
        return self.min_visible_pixels or max(8, int(round(0.004 * self.image_size ** 2)))

    @classmethod
    def from_config(cls, cfg, **overrides) -> "WorldConfig":
        """Build from the experiment config (`cfg.data.image_size/min_objects/max_objects` and the
        `cfg.data.world` preset, WORLD_PRESETS)."""
        d = cfg.data if hasattr(cfg, "data") else cfg
        kw = dict(image_size=int(d.image_size), min_objects=int(d.min_objects), max_objects=int(d.max_objects))
        kw.update(overrides)
        return cls.named(str(d.get("world", "full")), **kw)

    @classmethod
    def named(cls, world: str = "full", **fields) -> "WorldConfig":
        """The `world` preset (WORLD_PRESETS, `data.world`) with the other fields given."""
        return cls(**{**WORLD_PRESETS[world], **fields})


# What a world contains, by name (`data.world`). "simple" is a lever of the issue-12 base search: four
# shapes that differ at 32 px, four colours, medium and large objects only, flat colours on a plain
# background; everything else (splits, held-out pairs, geometry, depth) is as in "full".
WORLD_PRESETS: dict[str, dict] = {
    "full": {},
    "simple": dict(shapes=("circle", "square", "triangle", "star"), colors=("red", "green", "blue", "yellow"),
                   sizes=("medium", "large"), textures=("flat",), textured_background=False),
}


assert tuple(WORLD_PRESETS) == config.WORLDS, "config.WORLDS names the presets"


def world_suffix(name: str) -> str:
    """The part of dataset / tokenizer directory names that tells the preset ("" for full)."""
    return "" if name == "full" else f"_{name}"


def split_rng(seed: int, split: str) -> np.random.Generator:
    """The generator of one scene: disjoint streams per split (SeedSequence on [salt, split, seed])."""
    if split not in _SPLIT_ID:
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
    return np.random.default_rng([_SEED_SALT, _SPLIT_ID[split], int(seed)])


def allowed_pairs(cfg: WorldConfig, split: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs an object may take in a split (held-out pairs only in "heldout")."""
    pairs = list(itertools.product(cfg.colors, cfg.shapes))
    if split == "heldout":
        return pairs
    held = set(HELDOUT_PAIRS)
    return [p for p in pairs if p not in held]


# ---------------------------------------------------------------------------------------------
# painting
# ---------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, cfg: WorldConfig) -> tuple[np.ndarray, str, str]:
    s = cfg.image_size
    name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    base = np.asarray(BACKGROUNDS[name], np.float32)
    kind = BACKGROUND_TEXTURES[int(rng.integers(len(BACKGROUND_TEXTURES)))] if cfg.textured_background else "plain"
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    amp = BACKGROUND_RADIUS / np.sqrt(3) / 2  # two terms below, each at most amp per channel
    if kind == "plain":
        off = np.zeros((s, s), np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy) / s
        off = amp * (2 * (t - t.min()) / max(np.ptp(t), 1e-6) - 1)
    elif kind == "stripes":
        period = max(4, s // int(rng.integers(4, 9)))
        off = amp * np.where(((xx + yy * int(rng.integers(0, 2))) // (period // 2)) % 2 == 0, 1.0, -1.0)
    elif kind == "checker":
        cell = max(2, s // int(rng.integers(4, 9)))
        off = amp * np.where(((xx // cell) + (yy // cell)) % 2 == 0, 0.7, -0.7)
    else:  # noise
        off = np.clip(rng.normal(0, amp / 2, (s, s)), -amp, amp).astype(np.float32)
    tint = rng.uniform(-1, 1, 3).astype(np.float32)
    tint /= max(np.abs(tint).max(), 1e-6)
    grain = np.clip(rng.normal(0, amp / 3, (s, s, 1)), -amp, amp)
    img = base + off[..., None] * tint[None, None] + grain
    return img, name, kind


def _texture(rng: np.random.Generator, texture: str, rgb: tuple[int, int, int], ys: np.ndarray,
             xs: np.ndarray) -> np.ndarray:
    """Pixel colours of an object's pixels at (ys, xs): within TEXTURE_RADIUS of the colour."""
    base = np.asarray(rgb, np.float32)
    n = len(ys)
    if texture == "flat":
        return np.broadcast_to(base, (n, 3))
    step = TEXTURE_RADIUS / np.sqrt(3) * 0.98
    sign = -1.0 if base.mean() > 110 else 1.0  # darken light colours, lighten dark ones
    if texture == "stripes":
        period = int(rng.integers(3, 6))
        orient = int(rng.integers(0, 3))
        coord = (xs, ys, xs + ys)[orient]
        on = ((coord + int(rng.integers(0, period))) // period) % 2 == 0
        return base + (on[:, None] * sign * step)
    return base + np.clip(rng.normal(0, step / 2, (n, 3)), -step, step)


def _edges(instance: np.ndarray) -> np.ndarray:
    e = np.zeros(instance.shape, bool)
    dx = instance[:, 1:] != instance[:, :-1]
    dy = instance[1:, :] != instance[:-1, :]
    e[:, 1:] |= dx
    e[:, :-1] |= dx
    e[1:, :] |= dy
    e[:-1, :] |= dy
    return e.astype(np.uint8)


def _sample_depths(rng: np.random.Generator, n: int, gap: float) -> np.ndarray:
    """n distinct depths in [0.05, 0.95], pairwise at least `gap` apart, sorted far -> near."""
    for _ in range(100):
        d = np.sort(rng.uniform(0.05, 0.95, n))
        if n < 2 or np.diff(d).min() >= gap:
            return d[::-1]
    d = np.linspace(0.05, 0.95, n) + rng.uniform(-gap / 3, gap / 3, n)
    return np.sort(d)[::-1]


def _object_box(shape: str, cx: float, cy: float, radius: float) -> tuple[float, float, float, float]:
    hx, hy = half_extents(shape, radius)
    return cx - hx, cy - hy, cx + hx, cy + hy


def _raster(shape: str, box: tuple[float, float, float, float], s: int):
    """Pixels of a drawn object: (row slice, col slice, bool mask over that window)."""
    x0, y0, x1, y1 = box
    c0, c1 = max(0, int(np.floor(x0))), min(s, int(np.ceil(x1)) + 1)
    r0, r1 = max(0, int(np.floor(y0))), min(s, int(np.ceil(y1)) + 1)
    ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
    return slice(r0, r1), slice(c0, c1), shape_mask(shape, xs, ys, box)


_FOUR = ndimage.generate_binary_structure(2, 1)


def _visible_ok(instance: np.ndarray, k: int, full_area: int, cfg: WorldConfig, window) -> bool:
    vis = instance[window] == k
    area = int(vis.sum())
    if area < cfg.min_pixels or area < cfg.min_visible_fraction * full_area:
        return False
    return ndimage.label(vis, _FOUR)[1] == 1


def _boxes_apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def paint_scene(specs: list[dict], rng: np.random.Generator, cfg: WorldConfig, *,
                place: Callable[[np.random.Generator, dict, int], tuple[float, float]] | None = None,
                separate_all: bool = False, accept: Callable[[dict], bool] | None = None) -> dict | None:
    """Place and paint objects (dicts with shape/color/size/texture/depth, sorted far -> near).

    Placement is sequential in painting order; each new object is retried until every object painted
    so far stays detectable (visibility rules of the module docstring). `place(rng, spec, s)` may
    override where centres are drawn; `separate_all` forbids any overlap (used by prompt scenes);
    `accept(scene)` is a final predicate. Returns None when `cfg.max_tries` layouts all fail."""
    for _ in range(max(1, cfg.max_tries // 10)):
        scene = _try_paint(specs, rng, cfg, place, separate_all)
        if scene is not None and (accept is None or accept(scene)):
            return scene
    return None


def _default_place(rng: np.random.Generator, spec: dict, s: int, cfg: WorldConfig, box_half) -> tuple[float, float]:
    hx, hy = box_half
    cx = rng.uniform(hx + 0.5, s - hx - 0.5)
    if cfg.ground_plane:
        t = 0.18 + 0.64 * (1.0 - spec["depth"]) + rng.normal(0, 0.1)
        cy = float(np.clip(t * s, hy + 0.5, s - hy - 0.5))
    else:
        cy = rng.uniform(hy + 0.5, s - hy - 0.5)
    return cx, cy


def _try_paint(specs, rng, cfg, place, separate_all):
    s = cfg.image_size
    img, bg_name, bg_kind = _background(rng, cfg)
    instance = np.zeros((s, s), np.uint8)
    placed: list[dict] = []
    windows: list[tuple[slice, slice]] = []
    for k, spec in enumerate(specs, start=1):
        radius = SIZE_RADIUS[spec["size"]] * s
        if cfg.perspective:
            radius *= 1.15 - 0.3 * spec["depth"]
        hx, hy = half_extents(spec["shape"], radius)
        if 2 * hx + 1 >= s or 2 * hy + 1 >= s:
            return None
        ok = False
        for _ in range(cfg.max_tries):
            if place is not None:
                cx, cy = place(rng, spec, s)
            else:
                cx, cy = _default_place(rng, spec, s, cfg, (hx, hy))
            box = _object_box(spec["shape"], cx, cy, radius)
            if any(not _boxes_apart(box, o["_box"], 2.0) for o in placed
                   if separate_all or o["color"] == spec["color"]):
                continue
            rs, cs, m = _raster(spec["shape"], box, s)
            full = int(m.sum())
            if full < cfg.min_pixels:
                continue
            trial = instance.copy()
            trial[rs, cs][m] = k
            if not _visible_ok(trial, k, full, cfg, (rs, cs)):
                continue
            hit = [j for j in range(len(placed)) if (instance[rs, cs][m] == j + 1).any()]
            if all(_visible_ok(trial, j + 1, placed[j]["full_area"], cfg, windows[j]) for j in hit):
                ok = True
                break
        if not ok:
            return None
        instance = trial
        ys, xs = np.nonzero(m)
        ys, xs = ys + rs.start, xs + cs.start
        img[ys, xs] = _texture(rng, spec["texture"], COLORS[spec["color"]], ys, xs)
        placed.append(dict(spec, _box=box, center=[float(cx), float(cy)], radius=float(radius), full_area=full))
        windows.append((rs, cs))
    return _finish(img, instance, placed, bg_name, bg_kind)


def _finish(img, instance, placed, bg_name, bg_kind) -> dict:
    objects = []
    for k, o in enumerate(placed, start=1):
        ys, xs = np.nonzero(instance == k)
        objects.append({
            "shape": o["shape"], "color": o["color"], "size": o["size"], "texture": o["texture"],
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
            "centroid": [float(xs.mean() + 0.5), float(ys.mean() + 0.5)],
            "depth": float(o["depth"]), "area": int(len(xs)), "full_area": int(o["full_area"]),
            "center": o["center"], "radius": o["radius"],
        })
    sem_lut = np.array([0] + [SHAPES.index(o["shape"]) + 1 for o in objects], np.uint8)
    dep_lut = np.array([255] + [depth_level(o["depth"]) for o in objects], np.uint8)
    return {
        "image": np.clip(np.rint(img), 0, 255).astype(np.uint8),
        "instance": instance,
        "semantic": sem_lut[instance],
        "depth": dep_lut[instance],
        "edges": _edges(instance),
        "objects": objects,
        "background": bg_name,
        "background_texture": bg_kind,
    }


def depth_level(depth: float) -> int:
    """Quantised depth stored in the depth map (larger = farther; 255 = background)."""
    return int(min(254, round(255 * depth)))


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------
def sample_objects(rng: np.random.Generator, cfg: WorldConfig, split: str, n: int) -> list[dict]:
    """n object specs with unique (colour, shape) pairs, depths sorted far -> near."""
    pairs = allowed_pairs(cfg, split)
    chosen: list[tuple[str, str]] = []
    if split == "heldout":
        held = [p for p in HELDOUT_PAIRS if p[0] in cfg.colors and p[1] in cfg.shapes]
        if not held:
            raise ValueError("heldout split: the WorldConfig excludes every held-out pair")
        chosen.append(held[int(rng.integers(len(held)))])
    while len(chosen) < n:
        p = pairs[int(rng.integers(len(pairs)))]
        if p not in chosen:
            chosen.append(p)
    order = rng.permutation(n)  # the held-out object gets a random depth rank
    depths = _sample_depths(rng, n, cfg.min_depth_gap)
    return [{"color": chosen[i][0], "shape": chosen[i][1],
             "size": cfg.sizes[int(rng.integers(len(cfg.sizes)))],
             "texture": cfg.textures[int(rng.integers(len(cfg.textures)))],
             "depth": float(depths[r])} for r, i in enumerate(order)]


def generate_scene(seed: int, cfg: WorldConfig = WorldConfig(), split: str = "train") -> dict:
    """One scene, a pure function of (seed, cfg, split). See the module docstring for the fields."""
    rng = split_rng(seed, split)
    for _ in range(cfg.max_tries):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        specs = sample_objects(rng, cfg, split, n)
        scene = paint_scene(specs, rng, cfg)
        if scene is not None:
            scene.update(seed=int(seed), split=split)
            return scene
    raise RuntimeError(f"could not lay out a scene for seed {seed} ({cfg}); lower max_objects or sizes")


def generate_scenes(seeds, cfg: WorldConfig = WorldConfig(), split: str = "train") -> list[dict]:
    return [generate_scene(int(s), cfg, split) for s in seeds]


def scene_objects(scene: Mapping[str, Any]) -> list[dict]:
    """The object list of a scene or of a stored record: a list of dicts, a JSON string/bytes, or
    columnar arrays under `objects/<field>` or `objects` = {field: array}."""
    objs = scene.get("objects") if hasattr(scene, "get") else scene["objects"]
    if isinstance(objs, (bytes, np.bytes_)):
        objs = objs.decode()
    if isinstance(objs, str):
        import json

        objs = json.loads(objs)
    if objs is None:
        cols = {k.split("/", 1)[1]: v for k, v in scene.items() if k.startswith("objects/")}
        objs = cols
    if isinstance(objs, Mapping):
        cols = {k: list(np.asarray(v).tolist()) for k, v in objs.items()}
        n = len(next(iter(cols.values()))) if cols else 0
        objs = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    out = []
    for o in objs:
        o = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in dict(o).items()}
        out.append(o)
    return out
