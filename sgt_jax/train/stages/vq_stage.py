"""Stage "vq": train the image tokenizer on scene photos and every proxy-target rendering.

One tokenizer serves the whole UMM (photos for text-to-image, palette masks / depth / edges for the
SGT proxies), so each training example is one Shapes World record rendered as a randomly chosen
kind (`cfg.model.vq.target_mix`). Loss per batch:

    sum_i w_i * recon(x_i, x^_i) / B  +  codebook  +  beta * commitment

with w_i = `mask_loss_weight` for palette masks (their edges decide mIoU) and 1 otherwise. After
every update `post_update` keeps an EMA of code usage in `model_state` and, every
`dead_code_reinit_every` steps, moves codes whose usage fell below `dead_code_threshold / K` onto
encoder outputs of the current batch (in-graph).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.data import datasets, pipeline
from sgt_jax.data.render import MASK_KINDS, parse_target_mix, render_target
from sgt_jax.models import vq as vq_lib
from sgt_jax.train.stage import BaseStage, register_stage
from sgt_jax.train.stages import vq_eval


class VQTransform:
    """record -> {"image": uint8[H,W,3] rendering of a random kind, "weight": f32 loss weight}.

    A class (not a closure) so grain can pickle it into worker processes.
    """

    def __init__(self, mix: dict[str, float], mask_weight: float):
        self.kinds = tuple(mix)
        self.probs = np.asarray([mix[k] for k in self.kinds], np.float64)
        self.mask_weight = float(mask_weight)

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:

        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.probs))]
        _, target = render_target(record, kind, rng)
        weight = self.mask_weight if kind in MASK_KINDS else 1.0
        return {"image": np.asarray(target, np.uint8), "weight": np.float32(weight)}


def recon_error(recon: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    """Per-example mean reconstruction error, [B]."""
    diff = recon - target
    err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


@register_stage("vq")
class VQStage(BaseStage):
    """Stage protocol implementation for the VQ tokenizer (see module docstring)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        v = cfg.model.vq
        self.spec = vq_lib.spec_from_config(cfg)
        self.model = vq_lib.build_model(cfg)
        self.mix = parse_target_mix(v.target_mix)
        self.recon_kind = str(v.recon_loss)
        self.beta = float(v.beta)
        self.usage_decay = float(v.usage_decay)
        self.reinit_every = int(v.dead_code_reinit_every)
        self.threshold = float(v.dead_code_threshold)
        self.post_update = self._post_update

    # -- shapes ------------------------------------------------------------------------------------
    def dummy_batch(self, batch_size: int) -> dict[str, Any]:
        s = self.spec.image_size
        return {"image": np.zeros((batch_size, s, s, 3), np.uint8), "weight": np.ones((batch_size,), np.float32)}

    def tokens_per_example(self) -> float:
        return float(self.spec.num_codes)

    # -- params --------------------------------------------------------------------------------------
    def init(self, rng, example_batch):
        params = vq_lib.init_params(self.model, rng)
        model_state = {"usage": jnp.zeros((self.spec.codebook_size,), jnp.float32)}
        return params, model_state

    # -- loss ------------------------------------------------------------------------------------
    def loss_fn(self, params, model_state, batch, rng, step):
        del rng, step
        x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
        w = batch["weight"].astype(jnp.float32)
        recon, stats = self.model.apply({"params": params}, x)
        per_example = recon_error(recon, x, self.recon_kind)
        recon_loss = jnp.mean(w * per_example)
        loss = recon_loss + stats["codebook_loss"] + self.beta * stats["commit_loss"]
        mse = jnp.mean(jnp.square(jnp.clip(recon, -1.0, 1.0) - x))
        metrics = {
            "recon_loss": recon_loss, "codebook_loss": stats["codebook_loss"], "commit_loss": stats["commit_loss"],
            "perplexity": stats["perplexity"], "batch_usage": stats["usage"],
            "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)),
            # non-scalars: consumed by post_update only
            "code_counts": stats["counts"], "latents": stats["latents"],
        }
        return loss, (metrics, model_state)

    def _post_update(self, params, model_state, aux, rng, step):
        usage = vq_lib.update_usage(model_state["usage"], aux["code_counts"], self.usage_decay)
        if self.reinit_every <= 0:
            return params, {**model_state, "usage": usage}
        codebook = params["quantizer"]["codebook"]
        new_cb, new_usage, _ = vq_lib.reinit_dead_codes(codebook, usage, aux["latents"], rng, self.threshold)
        do = (step + 1) % self.reinit_every == 0
        quant = {**params["quantizer"], "codebook": jnp.where(do, new_cb, codebook)}
        params = {**params, "quantizer": quant}
        return params, {**model_state, "usage": jnp.where(do, new_usage, usage)}

    # -- FLOPs ----------------------------------------------------------------------------------------
    def flops_per_example(self) -> float:
        """3 x the forward FLOPs XLA counts for one image (encoder + quantiser + decoder)."""
        if not hasattr(self, "_flops"):
            s = self.spec
            params = nn.meta.unbox(jax.eval_shape(lambda: vq_lib.init_params(self.model, jax.random.key(0))))
            images = jax.ShapeDtypeStruct((1, s.image_size, s.image_size, 3), jnp.float32)
            try:
                cost = jax.jit(lambda p, x: self.model.apply({"params": p}, x)[0]).lower(params, images).cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                self._flops = 3.0 * float(cost.get("flops", 0.0))
            except Exception:  # backend without cost analysis: fall back to the matmul count
                self._flops = 3.0 * analytic_forward_flops(s)
        return self._flops

    # -- data ---------------------------------------------------------------------------------------------
    def example_transform(self, split: str) -> Callable[[dict, np.random.Generator], dict]:
        return VQTransform(self.mix, float(self.cfg.model.vq.mask_loss_weight))

    def make_iterator(self, split: str, *, process_index: int, process_count: int, seed: int, **_):
        """The shared grain pipeline over the built Shapes World split (built on first use)."""

        datasets.ensure_dataset(self.cfg)
        return pipeline.make_iterator(self.cfg, split, self.example_transform(split), process_index=process_index,
                                      process_count=process_count, seed=seed)

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, params, model_state, *, step, workdir) -> dict[str, float]:

        if int(self.cfg.eval.num_examples) <= 0:
            return {}
        res = vq_eval.evaluate(self.cfg, params, out_dir=os.path.join(workdir, "eval"), step=step)
        return {f"eval/{k}": float(v) for k, v in res.items() if isinstance(v, (int, float))}


def analytic_forward_flops(spec: vq_lib.VQSpec) -> float:
    """Matmul FLOPs of one forward pass of the vit family (used where XLA cost analysis is missing)."""
    n, d, p = spec.num_codes, spec.width, spec.downsample
    block = 2 * n * (4 * d * d + 2 * spec.mlp_ratio * d * d) + 4 * n * n * d
    enc = 2 * n * (p * p * 3) * d + spec.depth * block + 2 * n * d * spec.code_dim
    dec = 2 * n * spec.code_dim * d + (spec.decoder_depth or spec.depth) * block + 2 * n * d * p * p * 3
    quant = 2 * n * spec.codebook_size * spec.code_dim
    return float(enc + dec + quant)
