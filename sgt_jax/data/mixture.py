"""The task mixture of a run: which tasks, by what weights, with which transforms.

Built once from `data.mixture` (`Mixture.from_config`) and handed to the grain pipeline (which
mixes the per-task datasets) and to the training stage (which names its per-task metrics after
it), so no other module reads `data.mixture`. The field's names and weights are checked by
`config.check_core`; this object only carries them.

`mode` (`data.mixing`) says how tasks share the batches: "rows" interleaves rows by weight with
grain's `MapDataset.mix`, so a batch holds rows of several tasks; "batches" cycles whole
single-task batches (`pipeline.interleave_batches`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from sgt_jax.config import TASKS

Transform = Callable[[dict, np.random.Generator], dict]
MODES = ("rows", "batches")  # data.mixing: rows interleaved by weight, or whole single-task batches


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Tasks in mixing order (sorted names, the order grain interleaves them in), their weights,
    their `config.TASKS` ids (None for a task outside TASKS) and, once bound, their transforms."""

    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    transforms: tuple[Transform, ...] | None = None
    mode: str = "rows"

    def __post_init__(self):
        if len(self.tasks) != len(self.weights) or not self.tasks:
            raise ValueError(f"a mixture needs one weight per task, got tasks {self.tasks} weights {self.weights}")
        if self.transforms is not None and len(self.transforms) != len(self.tasks):
            raise ValueError(f"a mixture needs one transform per task {self.tasks}")
        if self.mode not in MODES:
            raise ValueError(f"mixture mode {self.mode!r} is not allowed; allowed: {list(MODES)}")

    @classmethod
    def from_config(cls, cfg, transforms: Mapping[str, Transform] | Callable[[str], Transform] | None = None
                    ) -> "Mixture":
        """The mixture of `cfg.data.mixture`; `transforms` (task -> transform, or a factory called per
        task) binds them. A mapping must cover every mixed task; tasks it has beyond them are unused."""
        weights = {str(t): float(w) for t, w in dict(cfg.data.mixture).items()}
        tasks = tuple(sorted(weights))
        mixture = cls(tasks, tuple(weights[t] for t in tasks), mode=str(cfg.data.mixing))
        return mixture if transforms is None else mixture.bind(transforms)

    @classmethod
    def single(cls, transform: Transform, name: str = "default") -> "Mixture":
        """One transform over all records (the VQ stage): no task id is added to the examples."""
        return cls((name,), (1.0,), (transform,))

    @property
    def ids(self) -> tuple[int | None, ...]:
        return tuple(TASKS.index(t) if t in TASKS else None for t in self.tasks)

    def bind(self, transforms: Mapping[str, Transform] | Callable[[str], Transform]) -> "Mixture":
        if isinstance(transforms, Mapping):
            missing = [t for t in self.tasks if t not in transforms]
            if missing:
                raise ValueError(f"config field 'data.mixture' names tasks {missing} that have no transform; "
                                 f"transforms exist for {sorted(transforms)}")
            bound = tuple(transforms[t] for t in self.tasks)
        else:
            bound = tuple(transforms(t) for t in self.tasks)
        return dataclasses.replace(self, transforms=bound)

    def items(self) -> list[tuple[str, float, int | None, Transform]]:
        """(task, weight, id, transform) per task, in mixing order."""
        if self.transforms is None:
            raise ValueError(f"mixture {self.tasks} has no transforms bound (Mixture.bind)")
        return list(zip(self.tasks, self.weights, self.ids, self.transforms, strict=True))

    def as_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "weights": list(self.weights), "mode": self.mode}
