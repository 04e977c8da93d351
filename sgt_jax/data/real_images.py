"""Real photographs and their masks brought to the fixed square sizes the model reads.

Why these rules:
* Letterbox, not stretch or crop: the longer side is resized to the stored side S and the image is
  centred on a grey (127) square (Janus' pad colour), so no instance is cut away and aspect ratios
  survive. The ViT and VQ sizes are then plain square resizes of the stored square.
* Masks are resized with nearest-neighbour only, never bicubic: interpolation blends two instance
  colours at every edge into a colour that belongs to neither (the official SGT code's bicubic resize
  does exactly this). Mask colours are first snapped to the mask's own major colours, which also
  undoes such blends in released masks.
* Instances get ids 1..15 of `render.INSTANCE_PALETTE` by area (largest first, ties by the first
  pixel in raster order), so a target is a deterministic function of the image's segmentation. More
  than 15 instances: the smallest become background (counted as `dropped`).
"""
from __future__ import annotations

import io

import numpy as np

from sgt_jax.data import render

MAX_INSTANCES = len(render.INSTANCE_PALETTE) - 1  # palette entry 0 is the background
PAD_VALUE = 127
MIN_COLOUR_PIXELS = 16  # mask colours covering fewer source pixels are blend noise, snapped away
JPEG_QUALITY = 95


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [H, W, 3] RGB. Raises ValueError on bytes that do not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except UnidentifiedImageError as e:  # its message holds a BytesIO address: keep reasons reproducible
        raise ValueError("image does not decode: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image does not decode: {type(e).__name__}: {e}") from e


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def letterbox_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of an image scaled so its longer side is `size`, centred."""
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def letterbox(image: np.ndarray, size: int, *, nearest: bool = False, pad_value: int = PAD_VALUE) -> np.ndarray:
    """uint8 [H, W(, C)] -> [size, size(, C)]: longer side to `size`, centred on `pad_value`.
    `nearest=True` for label maps (ids or flat colours), bicubic otherwise."""
    from PIL import Image

    image = np.asarray(image)
    h, w = image.shape[:2]
    new_h, new_w, top, left = letterbox_geometry(h, w, size)
    if (new_h, new_w) != (h, w):
        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    out = np.full((size, size) + image.shape[2:], pad_value, image.dtype)
    out[top:top + new_h, left:left + new_w] = image
    return out


def resize_ids_to_image(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an id map to the image's resolution (masks may be stored at
    another one)."""
    from PIL import Image

    ids = np.asarray(ids)
    if ids.shape == (height, width):
        return ids
    if ids.max(initial=0) > 255:
        raise ValueError(f"id map has ids up to {int(ids.max())}; at most 255 fit a uint8 map")
    return np.asarray(Image.fromarray(ids.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST))


def order_instances(segment_map: np.ndarray, candidates: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Any integer segment map (0 = background) -> (uint8 instance ids 0..15, dropped count).

    Ids by area, largest first, ties by the first pixel in raster order; `candidates` limits which
    segment values may become instances (others are background)."""
    flat = np.asarray(segment_map).ravel()
    values, first, counts = np.unique(flat, return_index=True, return_counts=True)
    keep = values != 0
    if candidates is not None:
        keep &= np.isin(values, candidates)
    values, first, counts = values[keep], first[keep], counts[keep]
    order = np.lexsort((first, -counts))  # primary: area descending; secondary: raster position
    chosen = values[order[:MAX_INSTANCES]]
    lut_values = np.concatenate([[0], chosen])
    ids = np.zeros(flat.shape, np.uint8)
    for new_id, v in enumerate(lut_values[1:], start=1):
        ids[flat == v] = new_id
    return ids.reshape(np.shape(segment_map)), max(0, len(values) - MAX_INSTANCES)


def colour_mask_to_segments(mask_rgb: np.ndarray, min_pixels: int = MIN_COLOUR_PIXELS) -> np.ndarray:
    """RGB mask (one flat colour per instance, black background) -> int32 segment map (0 =
    background, else a packed colour). Colours covering fewer than `min_pixels` pixels (edge blends)
    are snapped to the nearest major colour (black included)."""
    rgb = np.asarray(mask_rgb, np.int32)[..., :3]
    packed = rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)
    values, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    major = (counts >= min_pixels) | (values == 0)
    if not major.all():
        major_values = np.union1d(values[major], [0])
        unpack = lambda v: np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], -1)  # noqa: E731
        d = ((unpack(values)[:, None, :] - unpack(major_values)[None, :, :]) ** 2).sum(-1)
        values = major_values[d.argmin(1)]
    return values[inverse].reshape(packed.shape).astype(np.int32)


def panoptic_ids(png_rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG -> int32 segment ids (`id = R + 256 G + 256^2 B`, 0 = void)."""
    rgb = np.asarray(png_rgb, np.int64)[..., :3]
    return (rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]).astype(np.int32)


def _category_palette() -> np.ndarray:
    """Class colours for datasets with many categories (COCO panoptic: 133): black background, then
    the 15 instance colours (127+ apart), then the rest of a 6-level RGB grid in lexicographic order."""
    first = [tuple(int(x) for x in c) for c in render.INSTANCE_PALETTE]
    levels = range(0, 256, 51)
    grid = [(r, g, b) for r in levels for g in levels for b in levels]
    return np.array(first + [c for c in grid if c not in set(first)], np.uint8)


CATEGORY_PALETTE = _category_palette()  # 1 + 15 + 203 = 219 colours


def category_to_rgb(semantic: np.ndarray) -> np.ndarray:
    """uint8 class ids (0 = void, c = c-th category) -> RGB with `CATEGORY_PALETTE`."""
    return CATEGORY_PALETTE[np.asarray(semantic)]


def rgb_to_category(rgb: np.ndarray, num_classes: int) -> np.ndarray:
    """Nearest `CATEGORY_PALETTE` colour among the first num_classes + 1 -> class ids."""
    pal = CATEGORY_PALETTE[: num_classes + 1].astype(np.int32)
    d = ((np.asarray(rgb, np.int32)[..., None, :] - pal) ** 2).sum(-1)
    return d.argmin(-1).astype(np.uint8)
