"""Every rule a config must satisfy, listed in one place and run once per entry point.

`validate(cfg)` runs the schema and field rules of `sgt_jax.config`, then each section's cross-field
rules in the order of `SECTION_CHECKS`. The list is explicit (no registration on import), so a config
passes or fails the same way in every process, whatever was imported before. Rules live next to the
code that knows them (the UMM's shapes in `models.umm`, the dataset names in `data.datasets`, ...);
this module only composes them, so it sits above config, models and data and below train.

All of it runs before anything compiles and before the workdir is touched: `train.loop.run` calls
`validate(cfg, jax.device_count(), paths=True)` first and exits 2 on a ConfigError.
"""
from __future__ import annotations

import os
from typing import Callable

import ml_collections

from sgt_jax import config
from sgt_jax.data import datasets, render, tokenizer
from sgt_jax.models import umm, vq

Check = Callable[[ml_collections.ConfigDict], None]

SECTION_CHECKS: tuple[tuple[str, Check], ...] = (
    ("config", config.check_core),  # ranges, mixture, derived fields present, schedule, mesh rules
    ("model.vq", vq.check_config),
    ("model.umm", umm.check_config),
    ("data", datasets.check_config),
    ("model.vq.target_mix", render.check_config),
)


def check_paths(cfg: ml_collections.ConfigDict) -> None:
    """Files the run reads must exist: the `init_from` source. Cloud paths (gs://) are checked when read."""
    path = str(cfg.init_from.path)
    if path and "://" not in path and not os.path.exists(path):
        raise config.ConfigError(
            f"config field 'init_from.path' = {path!r} does not exist; allowed: a workdir or checkpoint directory "
            f"of an earlier stage, or '' to start from scratch")
    tok = str(cfg.data.tokenizer_dir)
    if tok and "://" not in tok and not os.path.exists(os.path.join(os.path.expanduser(tok), "tokenizer.json")):
        raise config.ConfigError(f"config field 'data.tokenizer_dir' = {tok!r} has no tokenizer.json")
    check_tokenizer_fits(cfg)


def check_tokenizer_fits(cfg: ml_collections.ConfigDict) -> None:
    """A UMM's embedding table must cover its tokenizer (with the image-span tokens it gains). Checked
    here, before the workdir is touched, whenever the tokenizer already exists on local disk (given by
    `data.tokenizer_dir`, or Shapes World's, built next to the data by an earlier stage)."""
    if cfg.stage != "umm":
        return
    path = datasets.tokenizer_dir_for(cfg)
    if "://" in path or not os.path.exists(os.path.join(path, "tokenizer.json")):
        return  # built on first use (Shapes World) or read remotely: the stage checks it when loading
    tokenizer.check_vocab_covers(tokenizer.load_tokenizer(path), cfg.model.umm.llm.vocab_size, path)


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None, *,
             paths: bool = False) -> ml_collections.ConfigDict:
    """Raise ConfigError naming the first bad field; return cfg unchanged when everything holds.

    `num_devices` adds the mesh and batch rules (pass `jax.device_count()`); `paths` adds the
    filesystem rules (entry points that are about to train)."""
    config.check_fields(cfg)
    for _, check in SECTION_CHECKS:
        check(cfg)
    if num_devices is not None:
        config.check_devices(cfg, num_devices)
    if paths:
        check_paths(cfg)
    return cfg


def prepare(cfg: ml_collections.ConfigDict, num_devices: int | None = None, *,
            paths: bool = False) -> ml_collections.ConfigDict:
    """`config.finalize` then `validate`: what an entry point runs once, after all overrides."""
    return validate(config.finalize(cfg), num_devices, paths=paths)
