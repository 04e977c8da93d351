"""The LlamaGen VQ-16 family (`model.vq.family="llamagen"`, Janus-Pro's tokenizer) trains in our own
VQ stage like the other families; its parity with transformers' JanusVQVAE is in
tests/test_convert_janus.py."""
from __future__ import annotations

import importlib.util
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from sgt_jax.checks import prepare as validate  # finalize + every rule
from sgt_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vq_smoke():
    spec = importlib.util.spec_from_file_location("vq_shapes", os.path.join(ROOT, "configs", "vq_shapes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config("smoke")
    v = cfg.model.vq
    v.family, v.width, v.num_res_blocks, v.z_channels = "llamagen", 32, 1, 32
    v.downsample, v.channel_mult = 4, (1, 1, 1)
    cfg.data.image_size = 16
    return cfg


def test_vq_stage_trains_the_llamagen_family():
    from sgt_jax.data import shapes_world
    from sgt_jax.train.stage import get_stage

    cfg = _vq_smoke()
    validate(cfg)
    stage = get_stage(cfg)
    assert stage.spec.family == "llamagen"
    world = shapes_world.WorldConfig(image_size=cfg.data.image_size)
    transform = stage.example_transform("train")
    rng = np.random.default_rng(0)
    examples = [transform(shapes_world.generate_scene(i, world, "train"), rng) for i in range(4)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    params, model_state = nn.meta.unbox(stage.init(jax.random.key(0), stage.dummy_batch(4)))
    assert "quant_conv" in params["encoder"] and "post_quant_conv" in params["decoder"]
    from test_vq import adam_losses

    losses, _ = adam_losses(stage, params, model_state, batch, steps=12)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


def test_llamagen_channels_must_fit_group_norm():
    cfg = _vq_smoke()
    cfg.model.vq.family, cfg.model.vq.downsample, cfg.model.vq.width = "llamagen", 4, 16
    cfg.model.vq.channel_mult = (1, 1, 2)
    with pytest.raises(ConfigError, match="multiples of 32"):
        validate(cfg)
    cfg = _vq_smoke()
    cfg.model.vq.family = "llamagen2"
    with pytest.raises(ConfigError, match="model.vq.family"):
        validate(cfg)
