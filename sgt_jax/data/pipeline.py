"""grain input pipeline: records -> validated -> per-task transform -> weighted mixture -> batches.

The tasks, weights and transforms come from one `mixture.Mixture` (built by the stage from
`data.mixture`); a single transform is a one-task mixture.

Per task the random-access stages are: decode+validate (bad records become `records.Invalid`
markers instead of raising), this process's slice, seeded shuffle and endless repeat (training
only), then the task's transform through `random_map` (each example gets its own deterministic
numpy Generator). Tasks are mixed with `MapDataset.mix` by the mixture's weights, converted
to an iterator, invalid markers are dropped (counted, logged with their key), and batched with
drop_remainder so every batch has a static shape.

Everything up to batching is index-based, so the iterator state is just positions plus the skip
counters: `get_state()/set_state()` restore exactly the same next batches, and the iterator works
with `grain.checkpoint.CheckpointSave/CheckpointRestore` in an Orbax composite checkpoint.
"""
from __future__ import annotations

import os
import zlib
from typing import Mapping, Sequence

import grain
import numpy as np
from absl import logging

from sgt_jax.data import datasets, records
from sgt_jax.data.mixture import Mixture, Transform
from sgt_jax.data.records import RecordSource

SKIP_CATEGORIES = ("undecodable", "missing_field", "bad_dtype", "bad_shape", "empty_objects", "bad_objects",
                   "inconsistent_maps", "no_instance", "empty_conversation", "other")
_STATE_KEY = "sgt_skipped"


class _ValidatedSource:
    """grain data source yielding parsed records or `Invalid` markers; never raises on bad bytes."""

    def __init__(self, source: RecordSource, image_size: int | None):
        self._source = source
        self._image_size = image_size

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        index = int(index)
        fallback = f"{self._source.name}[{index}]"
        try:
            raw = self._source.raw[index]
        except Exception as e:  # an unreadable chunk is one bad record, not a dead run
            return records.Invalid(fallback, f"undecodable: read failed: {type(e).__name__}: {e}")
        if self._source.decode is not None:
            return self._source.decode(raw, fallback)
        return records.decode_and_validate(raw, self._source.deserialize, fallback, image_size=self._image_size)

    def __repr__(self) -> str:  # grain uses it in pipeline summaries
        return f"ValidatedSource({self._source.name}, n={len(self)})"


class _ApplyTransform:
    """Run a task's transform on valid records; pass Invalid markers through untouched."""

    def __init__(self, fn: Transform, task_id: int | None):
        self._fn = fn
        self._task_id = task_id

    def __call__(self, element, rng: np.random.Generator):
        if isinstance(element, records.Invalid):
            return element
        out = self._fn(element, rng)
        if self._task_id is not None and "task" not in out:
            out = dict(out)
            out["task"] = np.int32(self._task_id)
        return out


class _SkipInvalidIterator(grain.DatasetIterator):
    """Drops `Invalid` markers, logs each with its key, and keeps per-category counts in its state."""

    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
        super().__init__(parent)
        self._counts = {c: 0 for c in SKIP_CATEGORIES}
        self._max_consecutive = max_consecutive
        self._logged = 0

    def __next__(self):
        consecutive = 0
        while True:
            element = next(self._parent)
            if not isinstance(element, records.Invalid):
                return element
            category = element.category if element.category in self._counts else "other"
            self._counts[category] += 1
            self._log_skip(element)
            consecutive += 1
            if consecutive >= self._max_consecutive:
                raise RuntimeError(f"{consecutive} records in a row were invalid (last: {element.key}: "
                                   f"{element.reason}); the dataset itself is broken, rebuild it")

    # A deleted shard makes every record of it invalid: log the first few, then only a count now and then.
    _LOG_FIRST, _LOG_EVERY = 5, 1000

    def _log_skip(self, element) -> None:
        self._logged += 1
        total = sum(self._counts.values())
        if self._logged <= self._LOG_FIRST:
            logging.warning("skipping corrupt record key=%s reason=%s (skipped so far: %d)",
                            element.key, element.reason, total)
        elif self._logged == self._LOG_FIRST + 1:
            logging.warning("more corrupt records (latest key=%s reason=%s); further skips are counted, and "
                            "logged every %d (skipped so far: %d)", element.key, element.reason,
                            self._LOG_EVERY, total)
        elif self._logged % self._LOG_EVERY == 0:
            logging.warning("skipped %d corrupt records so far (latest key=%s)", total, element.key)

    def get_state(self):
        return {"parent": self._parent.get_state(), _STATE_KEY: dict(self._counts)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._counts = {c: int(state[_STATE_KEY].get(c, 0)) for c in SKIP_CATEGORIES}

    def __str__(self) -> str:
        return "SkipInvalidIterator"


class _SkipInvalidIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __iter__(self):
        return _SkipInvalidIterator(self._parent.__iter__(), self._max_consecutive)

    def __str__(self) -> str:
        return "SkipInvalidIterDataset"


def skip_counts(state_or_iterator) -> dict[str, int]:
    """Skipped-record counts per category (+ "total"), summed over grain worker states if any.

    Accepts an iterator from `make_iterator` or its `get_state()`; counts survive checkpoint restore.
    """
    state = state_or_iterator.get_state() if hasattr(state_or_iterator, "get_state") else state_or_iterator
    totals = {c: 0 for c in SKIP_CATEGORIES}

    def visit(node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k == _STATE_KEY and isinstance(v, Mapping):
                    for c, n in v.items():
                        totals[c] = totals.get(c, 0) + int(n)
                else:
                    visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)

    visit(state)
    totals["total"] = sum(totals.values())
    return totals


def task_seed(seed: int, task: str, stage: str) -> int:
    """A stable 32-bit seed per (seed, task, stage) so tasks shuffle and augment independently."""
    return int(np.random.SeedSequence([seed, zlib.crc32(task.encode()), zlib.crc32(stage.encode())])
               .generate_state(1)[0])


def _task_dataset(source: RecordSource, fn: Transform, task: str, task_id: int | None, *, image_size, process_index,
                  process_count, seed, training) -> grain.MapDataset:
    ds = grain.MapDataset.source(_ValidatedSource(source, image_size))
    ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index}/{process_count} gets no records of {source.name} "
                         f"({len(source)} records)")
    if training:
        ds = ds.shuffle(seed=task_seed(seed, task, "shuffle")).repeat(None)
    return ds.random_map(_ApplyTransform(fn, task_id), seed=task_seed(seed, task, "transform"))


def batch_pattern(weights: Mapping[str, float], max_cycle: int = 12) -> list[str]:
    """The cycle of whole-batch tasks for `data.mixing = "batches"`: weights {proxy: 2, vqa: 1} ->
    [proxy, proxy, vqa]. Weights become the smallest integer ratio with a cycle of at most
    `max_cycle` batches; tasks run in descending weight (ties by name), each as one block, as the
    paper's OmniGen2 loader does (two segmentation batches, then one SFT batch). Zero weights drop out."""
    from fractions import Fraction

    live = {t: float(w) for t, w in weights.items() if float(w) > 0}
    if not live:
        raise ValueError(f"config field 'data.mixture' = {dict(weights)} has no positive weight")
    top = max(live.values())
    fracs = {t: Fraction(w / top).limit_denominator(max_cycle) for t, w in live.items()}
    denom = 1
    for f in fracs.values():
        denom = denom * f.denominator // np.gcd(denom, f.denominator)
    counts = {t: int(f * denom) for t, f in fracs.items()}
    g = 0
    for c in counts.values():
        g = int(np.gcd(g, c))
    counts = {t: c // g for t, c in counts.items()}
    if sum(counts.values()) > max_cycle or any(c == 0 for c in counts.values()):
        raise ValueError(f"config field 'data.mixture' = {dict(weights)}: with data.mixing='batches' the weights "
                         f"need a whole-batch cycle of at most {max_cycle} batches (got {counts})")
    order = sorted(counts, key=lambda t: (-counts[t], t))
    return [t for t in order for _ in range(counts[t])]


class _BatchInterleaveIterator(grain.DatasetIterator):
    """Whole batches from per-task iterators in a fixed cycle; the state is the cycle position plus
    every child's state, so a restore continues the cycle exactly."""

    def __init__(self, parents: Sequence[grain.DatasetIterator], pattern: Sequence[int]):
        super().__init__(list(parents))
        self._pattern = list(pattern)
        self._pos = 0

    def __next__(self):
        batch = next(self._parents[self._pattern[self._pos]])
        self._pos = (self._pos + 1) % len(self._pattern)
        return batch

    def get_state(self):
        return {"pos": self._pos, "parents": [p.get_state() for p in self._parents]}

    def set_state(self, state):
        self._pos = int(state["pos"])
        for p, s in zip(self._parents, state["parents"], strict=True):
            p.set_state(s)

    def __str__(self) -> str:
        return f"BatchInterleaveIterator(pattern={self._pattern})"


class _BatchInterleaveIterDataset(grain.IterDataset):
    def __init__(self, parents: Sequence[grain.IterDataset], pattern: Sequence[int]):
        super().__init__(list(parents))
        self._pattern = list(pattern)

    def __iter__(self):
        return _BatchInterleaveIterator([p.__iter__() for p in self._parents], self._pattern)

    def __str__(self) -> str:
        return "BatchInterleaveIterDataset"


def interleave_batches(batched: Mapping[str, grain.IterDataset], weights: Mapping[str, float]) -> grain.IterDataset:
    """`data.mixing = "batches"`: per-task batched datasets -> one dataset of whole single-task batches
    in the cycle `batch_pattern(weights)`. A finite (evaluation) pass ends with the first task that
    runs out."""
    pattern = batch_pattern(weights)
    names = sorted(batched)
    missing = sorted(set(pattern) - set(names))
    if missing:
        raise ValueError(f"interleave_batches: no batched dataset for tasks {missing}")
    return _BatchInterleaveIterDataset([batched[t] for t in names], [names.index(t) for t in pattern])


def make_dataset(cfg, split: str, transform: Transform | Mixture, *, process_index: int | None = None,
                 process_count: int | None = None, seed: int | None = None, batch_size: int | None = None,
                 training: bool | None = None, sources: RecordSource | Mapping[str, RecordSource] | None = None,
                 num_workers: int | None = None, max_consecutive_skips: int = 1000) -> grain.IterDataset:
    """The batched `grain.IterDataset` behind `make_iterator` (same arguments)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    seed = cfg.data.shuffle_seed if seed is None else seed
    training = (split == "train") if training is None else training
    if batch_size is None:
        if cfg.train.batch_size % process_count:
            raise ValueError(f"config field 'train.batch_size' = {cfg.train.batch_size} is not divisible by "
                             f"the process count {process_count}")
        batch_size = cfg.train.batch_size // process_count
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")

    if not isinstance(transform, Mixture) and not callable(transform):
        raise TypeError(f"make_dataset takes a transform or a data.mixture.Mixture, got {type(transform).__name__}")
    mixture = transform if isinstance(transform, Mixture) else Mixture.single(transform)
    if sources is None:

        sources = datasets.open_source(cfg, split)
    if isinstance(sources, RecordSource):
        sources = {t: sources for t in mixture.tasks}
    missing = [t for t in mixture.tasks if t not in sources]
    if missing:
        raise ValueError(f"no record source for tasks {missing}")

    image_size = cfg.data.image_size if cfg.data.dataset == "shapes_world" else None
    parts = [_task_dataset(sources[t], fn, t, task_id, image_size=image_size, process_index=process_index,
                           process_count=process_count, seed=seed, training=training)
             for t, _, task_id, fn in mixture.items()]
    read = grain.ReadOptions(num_threads=max(1, min(16, os.cpu_count() or 1)),
                             prefetch_buffer_size=max(16, 2 * batch_size))

    def batched(ds):  # skip invalid records, optionally pack rows (data.packing), batch with a static shape
        stream = _SkipInvalidIterDataset(ds.to_iter_dataset(read), max_consecutive_skips)
        if cfg.data.get("packing", False):  # variable-length examples share rows (data/packing.py)
            from sgt_jax.data import packing

            stream = packing.pack(stream, cfg.data.max_seq_len, num_bins=cfg.data.packing_bins, seed=seed,
                                  slot_keys=packing.SLOT_KEYS, max_segments=cfg.data.packing_max_segments)
        return stream.batch(batch_size, drop_remainder=True)

    if mixture.mode == "batches" and len(parts) > 1:  # data.mixing, carried by the Mixture
        it_ds = interleave_batches({t: batched(p) for t, p in zip(mixture.tasks, parts, strict=True)},
                                   dict(zip(mixture.tasks, mixture.weights, strict=True)))
    else:
        it_ds = batched(parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(mixture.weights)))
    num_workers = cfg.data.num_workers if num_workers is None else num_workers
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; library callers may not parse them
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def make_iterator(cfg, split: str, transform: Transform | Mixture, *,
                  process_index: int | None = None, process_count: int | None = None, seed: int | None = None,
                  batch_size: int | None = None, training: bool | None = None,
                  sources: RecordSource | Mapping[str, RecordSource] | None = None,
                  num_workers: int | None = None, max_consecutive_skips: int = 1000) -> grain.DatasetIterator:
    """A checkpointable iterator of per-process batches (dicts of numpy arrays, leading dim = batch_size).

    - `transform(record, rng) -> dict` maps a validated record (see `records`) to one example; a
      `Mixture` with bound transforms mixes its tasks by their weights and adds `task` (int32 index
      into `config.TASKS`) to each example that lacks it.
    - `process_index/process_count` default to `jax.process_index()/process_count()`; each process
      reads a disjoint strided slice of the records.
    - `seed` (default cfg.data.shuffle_seed) drives shuffling and each example's rng.
    - `batch_size` is per process (default cfg.train.batch_size // process_count).
    - `training` (default: split == "train") shuffles and repeats forever; otherwise one ordered
      pass that ends with StopIteration (remainder dropped).
    - `sources` overrides the on-disk split (a RecordSource, or one per task).
    Skipped records are logged with their key; `skip_counts(iterator)` reports them.
    """
    return iter(make_dataset(cfg, split, transform, process_index=process_index, process_count=process_count,
                             seed=seed, batch_size=batch_size, training=training, sources=sources,
                             num_workers=num_workers, max_consecutive_skips=max_consecutive_skips))
