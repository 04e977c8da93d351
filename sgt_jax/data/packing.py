"""Sequence packing: several variable-length examples share one fixed-length row, told apart by
segment ids, so short examples stop paying for a whole row of padding.

grain's first-fit packer does the bin packing; this module turns right-padded examples into
variable-length ones first (`unpad`) and the packer's `<key>_segment_ids` / `<key>_positions`
outputs into the model's inputs afterwards: `segment_ids` (0 = padding; attention stays inside a
segment), `positions` (RoPE restarts at 0 per segment), `attn_mask`, and loss weights cleared at the
last position of every segment (its next token belongs to another example). Loss normalisation
stays per token, so a packed row's loss is the sum of its examples' token losses.
"""
from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

SEQUENCE_KEYS = ("tokens", "attn_mask", "text_loss_weight", "gen_loss_mask")
_LOSS_KEYS = ("text_loss_weight", "gen_loss_mask")


def unpad(example: dict[str, Any], keys: Sequence[str] = SEQUENCE_KEYS) -> dict[str, np.ndarray]:
    """Cut a right-padded example to its real length (sum of attn_mask); only packable fields allowed."""
    extra, missing = sorted(set(example) - set(keys)), sorted(set(keys) - set(example))
    if missing:
        raise ValueError(f"packing: example lacks the sequence fields {missing} (has {sorted(example)})")
    if extra:
        raise ValueError(f"packing needs text-only examples of the sequence fields {list(keys)}; this example "
                         f"also has {extra} (image spans and per-row scalars cannot be packed: set "
                         "data.packing=False)")
    n = int(np.sum(np.asarray(example["attn_mask"]) > 0))
    return {k: np.asarray(v)[:n] for k, v in example.items()}


def from_packed(packed: dict[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """grain's packed element -> model inputs (segment_ids, positions, attn_mask, cleared loss ends)."""
    seg = np.asarray(packed["tokens_segment_ids"], np.int32)
    out = {k: np.asarray(packed[k]) for k in keys}
    out["segment_ids"] = seg
    out["positions"] = np.asarray(packed["tokens_positions"], np.int32)
    out["attn_mask"] = (seg > 0).astype(np.int32)
    last = np.append(seg[1:] != seg[:-1], True)  # the last position of each segment
    for k in _LOSS_KEYS:
        if k in out:
            out[k] = np.where(last, 0, out[k]).astype(out[k].dtype)
    return out


def pack(ds: grain.IterDataset, seq_len: int, *, num_bins: int = 8, seed: int = 0,
         keys: Sequence[str] = SEQUENCE_KEYS) -> grain.IterDataset:
    """Right-padded examples -> packed rows of `seq_len` (first fit over `num_bins` open rows)."""
    if seq_len <= 0 or num_bins <= 0:
        raise ValueError(f"packing needs seq_len > 0 and num_bins > 0, got {seq_len} and {num_bins}")
    keys = tuple(keys)
    ds = ds.map(lambda e: unpad(e, keys))
    ds = grain_exp.FirstFitPackIterDataset(ds, length_struct={k: seq_len for k in keys}, num_packing_bins=num_bins,
                                           seed=seed, shuffle_bins=False)
    return ds.map(lambda e: from_packed(e, keys))
