"""Sequence packing: several variable-length examples share one fixed-length row, told apart by
segment ids, so short examples stop paying for a whole row of padding.

grain's first-fit packer does the bin packing; this module turns right-padded examples into
variable-length ones first (`unpad`) and the packer's `<key>_segment_ids` / `<key>_positions`
outputs into the model's inputs afterwards (`from_packed`):
- `segment_ids` (0 = padding; attention stays inside a segment), `positions` (RoPE restarts at 0
  per segment), `attn_mask`, and loss weights cleared at the last position of every segment (its
  next token belongs to another example);
- UMM rows also carry per-example fields (`SLOT_KEYS`: the ViT image and target image of each
  example, their span starts, task, truncation flag). They are packed as `max_segments` slots per
  row, and each span start is moved from its example's own coordinates to the row's. Empty slots
  get start -1 and task -1; the model and the loss ignore them.

Loss normalisation stays per token, so a packed batch's loss is the unpacked batch's loss (a test
checks it), and a row's loss is the sum of its examples' token losses.
"""
from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

SEQUENCE_KEYS = ("tokens", "attn_mask", "text_loss_weight", "gen_loss_mask")
SLOT_KEYS = ("vit_image", "vit_start", "target_image", "gen_start", "task", "truncated")
_LOSS_KEYS = ("text_loss_weight", "gen_loss_mask")
_START_KEYS = ("vit_start", "gen_start")  # positions inside the example: shifted to the row's coordinates


def unpad(example: dict[str, Any], keys: Sequence[str] = SEQUENCE_KEYS,
          slot_keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Cut a right-padded example to its real length (sum of attn_mask); per-example `slot_keys`
    become one-element sequences (one slot). Any other field is an error: it could not be packed."""
    allowed = set(keys) | set(slot_keys)
    extra, missing = sorted(set(example) - allowed), sorted(allowed - set(example))
    if missing:
        raise ValueError(f"packing: example lacks the fields {missing} (has {sorted(example)})")
    if extra:
        raise ValueError(f"packing packs the sequence fields {list(keys)} and the per-example fields "
                         f"{list(slot_keys)}; this example also has {extra} (set data.packing=False, or "
                         "pack a stage whose examples have only those fields)")
    n = int(np.sum(np.asarray(example["attn_mask"]) > 0))
    out = {k: np.asarray(example[k])[:n] for k in keys}
    out.update({k: np.asarray(example[k])[None] for k in slot_keys})
    return out


def _segment_starts(seg: np.ndarray, max_segments: int) -> np.ndarray:
    """Row index where each segment 1..max_segments begins (-1 for a segment the row lacks)."""
    starts = np.full(max_segments + 1, -1, np.int64)
    ids, first = np.unique(seg, return_index=True)
    starts[ids] = first
    return starts


def from_packed(packed: dict[str, np.ndarray], keys: Sequence[str],
                slot_keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """grain's packed element -> model inputs (segment_ids, positions, attn_mask, cleared loss ends,
    per-slot span starts in row coordinates)."""
    seg = np.asarray(packed["tokens_segment_ids"], np.int32)
    out = {k: np.asarray(packed[k]) for k in keys}
    out["segment_ids"] = seg
    out["positions"] = np.asarray(packed["tokens_positions"], np.int32)
    out["attn_mask"] = (seg > 0).astype(np.int32)
    last = np.append(seg[1:] != seg[:-1], True)  # the last position of each segment
    for k in _LOSS_KEYS:
        if k in out:
            out[k] = np.where(last, 0, out[k]).astype(out[k].dtype)
    if slot_keys:
        slot_seg = np.asarray(packed[slot_keys[0] + "_segment_ids"], np.int32)
        used = slot_seg > 0
        row_start = _segment_starts(seg, len(slot_seg))[slot_seg]  # where each slot's example begins
        for k in slot_keys:
            v = np.asarray(packed[k])
            if k in _START_KEYS:
                v = np.where(used & (v >= 0), v + row_start, -1).astype(np.int32)
            elif k == "task":
                v = np.where(used, v, -1).astype(np.int32)
            out[k] = v
    return out


def pack(ds: grain.IterDataset, seq_len: int, *, num_bins: int = 8, seed: int = 0,
         keys: Sequence[str] = SEQUENCE_KEYS, slot_keys: Sequence[str] = (),
         max_segments: int | None = None) -> grain.IterDataset:
    """Right-padded examples -> packed rows of `seq_len` positions (first fit over `num_bins` open
    rows). With `slot_keys`, a row holds at most `max_segments` examples, and each slot key becomes
    an array of `max_segments` entries (one per example, in segment order)."""
    if seq_len <= 0 or num_bins <= 0:
        raise ValueError(f"packing needs seq_len > 0 and num_bins > 0, got {seq_len} and {num_bins}")
    keys, slot_keys = tuple(keys), tuple(slot_keys)
    if slot_keys and (max_segments is None or max_segments <= 0):
        raise ValueError(f"packing per-example fields {list(slot_keys)} needs max_segments > 0, got {max_segments}")
    lengths = {k: seq_len for k in keys}
    lengths.update({k: max_segments for k in slot_keys})
    ds = ds.map(lambda e: unpad(e, keys, slot_keys))
    ds = grain_exp.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed,
                                           shuffle_bins=False, max_sequences_per_bin=max_segments)
    return ds.map(lambda e: from_packed(e, keys, slot_keys))
