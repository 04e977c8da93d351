"""Shared pieces of the Hugging Face importers: reading a local checkpoint directory, checking a
converted tree against the model's own parameter tree, placing it on a mesh, and writing it where
`init_from` finds it.

No torch: tensors are read with `safetensors` (numpy); bfloat16 tensors, which numpy cannot
express, are read from the file's raw bytes as `ml_dtypes.bfloat16`.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

log = logging.getLogger(__name__)
PyTree = Any

_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
               "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class HFCheckpoint:
    """Lazy name -> numpy array view over every `*.safetensors` file of a local HF model directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        cfg_file = self.dir / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{self.dir}: no config.json (expected a Hugging Face model directory)")
        self.config: dict = json.loads(cfg_file.read_text())
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.dir}: no *.safetensors files (convert .bin checkpoints with "
                                    "transformers' save_pretrained(safe_serialization=True) first)")
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="numpy") as h:
                for name in h.keys():
                    self._where[name] = f
        self.used: set[str] = set()

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.dir}: tensor {name!r} not found; e.g. {self.keys()[:8]}")
        self.used.add(name)
        path = self._where[name]
        with safe_open(str(path), framework="numpy") as h:
            try:
                return h.get_tensor(name)
            except (TypeError, ValueError):  # bfloat16 and friends: numpy has no native dtype
                pass
        return _read_raw(path, name)

    def prefix_of(self, suffix: str) -> str:
        """The name prefix in front of `suffix` (e.g. "model." or "language_model.model.")."""
        hits = [k[: -len(suffix)] for k in self._where if k.endswith(suffix)]
        if not hits:
            raise KeyError(f"{self.dir}: no tensor ending in {suffix!r}; e.g. {self.keys()[:8]}")
        return min(hits, key=len)


def _read_raw(path: Path, name: str) -> np.ndarray:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    info = header[name]
    start, end = info["data_offsets"]
    dtype = np.dtype(_RAW_DTYPES[info["dtype"]])
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + start, shape=(end - start,))
    return np.array(data).view(dtype).reshape(info["shape"])


class StackedLeaf:
    """Per-layer tensors not read yet (e.g. the Janus importer's lazy tensors), stacked on demand:
    `materialize` reads them one at a time into the [depth, ...] array; `sources` lists their keys."""

    def __init__(self, parts: list):
        self.parts = list(parts)
        self.shape = (len(self.parts),) + tuple(self.parts[0].shape)
        self.sources = tuple(getattr(p, "source", None) for p in self.parts)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def materialize(self, dtype=None) -> np.ndarray:
        first = self.parts[0].materialize(dtype)
        out = np.empty(self.shape, first.dtype)
        out[0] = first
        for i, part in enumerate(self.parts[1:], start=1):
            out[i] = part.materialize(dtype)
        return out

    def __array__(self, dtype=None, copy=None):
        return self.materialize(dtype)


def stack_layers(layers: list[PyTree]) -> PyTree:
    """Per-layer trees (HF order) -> one tree with a leading layer axis on every leaf.

    The one place the scanned layout is made: the models run their layers under `nn.scan`
    (`layers.scanned`), whose parameters are the per-layer ones stacked on axis 0. Lazy leaves
    (anything with `materialize`) stay lazy as a `StackedLeaf`.
    """
    if not layers:
        raise ValueError("no layers to stack")

    def stack(*xs):
        if any(hasattr(x, "materialize") for x in xs):
            return StackedLeaf(list(xs))
        return np.stack([np.asarray(x) for x in xs])

    return jax.tree_util.tree_map(stack, *layers)


def check_tree(converted: PyTree, abstract: PyTree, what: str) -> None:
    """Raise unless `converted` has exactly the paths and shapes of the model's parameter tree."""
    def flat(tree):
        return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    got, want = flat(converted), flat(abstract)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"{what}: converted parameters do not match the model: missing {missing[:10]}, "
                         f"unexpected {extra[:10]}")
    bad = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    if bad:
        raise ValueError(f"{what}: shape mismatch (path, converted, model): {bad[:10]}")


def place(params: PyTree, boxed_abstract: PyTree, mesh: jax.sharding.Mesh | None, rules: Iterable | None,
          dtype=np.float32) -> PyTree:
    """Cast to `dtype` and, with a mesh, put each leaf on the NamedSharding its logical names give."""
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=dtype), params)
    if mesh is None:
        return jax.tree_util.tree_map(jax.numpy.asarray, params)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_abstract), mesh, tuple(rules or ()))
    return jax.tree_util.tree_map(jax.device_put, params, shardings)


def report_unused(ckpt: HFCheckpoint, keep: Callable[[str], bool], what: str) -> list[str]:
    """Tensors of the checkpoint's relevant part that the importer did not read (logged, returned)."""
    unused = [k for k in ckpt.keys() if keep(k) and k not in ckpt.used]
    if unused:
        log.warning("%s: %d checkpoint tensors were not used, e.g. %s", what, len(unused), unused[:5])
    return unused


def save_for_init_from(out_dir: str | Path, params: PyTree, metadata: dict, step: int = 0,
                       max_host_transfer_gb: int | None = None) -> Path:
    """Write {"params": params} where `init_from.path=out_dir` finds it.

    Layout mirrors a training run: <out_dir>/checkpoints/<step>/state (Orbax PyTree) and
    <out_dir>/checkpoints/<step>/metadata/metadata (JSON). `max_host_transfer_gb` bounds the arrays
    Orbax stages for writing at once (big imports: peak memory stays near one copy of the params).
    """
    import orbax.checkpoint as ocp

    step_dir = Path(out_dir).resolve() / "checkpoints" / str(step)
    step_dir.mkdir(parents=True, exist_ok=True)
    if max_host_transfer_gb is None:
        ckptr = ocp.PyTreeCheckpointer()
    else:
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_concurrent_gb=max_host_transfer_gb,
                                                             save_device_host_concurrent_gb=max_host_transfer_gb))
    ckptr.save(step_dir / "state", {"params": params}, force=True)
    (step_dir / "metadata").mkdir(exist_ok=True)
    (step_dir / "metadata" / "metadata").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return step_dir
