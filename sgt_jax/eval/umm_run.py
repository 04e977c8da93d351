"""One UMM run as the evaluators see it: model + params, frozen VQ, tokenizer, sequence layout,
and the sampling settings of `eval.umm`.

Restored from a workdir (`sgt_jax.train.restore`) or built from in-memory params (tests, or right
after training). Jitted functions take the model as a static argument, so several runs with the same
architecture (base / SFT / SGT) share one compilation per function in one process.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.data import datasets, sequences
from sgt_jax.data import shapes_world as sw
from sgt_jax.infer import prompts as prompts_lib
from sgt_jax.infer import sampler as sampler_lib
from sgt_jax.models import umm as umm_lib
from sgt_jax.models import vq as vq_lib
from sgt_jax.train import restore


def t2i_sampling(settings) -> sampler_lib.SamplingConfig:
    """Text-to-image sampling for GenEval from an `eval.umm` section."""
    return sampler_lib.SamplingConfig(guidance_scale=float(settings.guidance_scale),
                                      temperature=float(settings.temperature), top_k=int(settings.top_k),
                                      top_p=float(settings.top_p), seed=int(settings.seed))


def seg_sampling(settings) -> sampler_lib.SamplingConfig:
    """Mask sampling for segmentation inference (greedy by default: top_k = 1)."""
    return sampler_lib.SamplingConfig(guidance_scale=float(settings.seg_guidance_scale),
                                      temperature=float(settings.seg_temperature), top_k=int(settings.seg_top_k),
                                      top_p=1.0, seed=int(settings.seed))


@functools.lru_cache(maxsize=16)
def _encode_fn(vq_model):
    """Jitted uint8 images -> flat code ids with the frozen VQ (one compile per VQ architecture)."""
    def run(vq_params, images):
        codes = vq_lib.encode(vq_model, vq_params, images.astype(jnp.float32) / 127.5 - 1.0)
        return codes.reshape(codes.shape[0], -1).astype(jnp.int32)

    return jax.jit(run)


@dataclasses.dataclass
class UMMRun:
    """Everything the evaluators need from one run: model + params, frozen VQ, tokenizer, layout."""

    cfg: Any
    model: Any  # sgt_jax.models.umm.UMM
    params: Any  # UMM params
    vq_model: Any  # sgt_jax.models.vq.VQModel
    vq_params: Any
    tokenizer: Any
    builder: sequences.SequenceBuilder
    world: sw.WorldConfig
    step: int = 0
    workdir: str | None = None

    @classmethod
    def from_params(cls, cfg, params, vq_params, tokenizer, *, step: int = 0, workdir: str | None = None) -> "UMMRun":
        """A run from in-memory params (e.g. straight after training, or a test fixture)."""
        model = umm_lib.UMM(umm_lib.UMMConfig.from_config(cfg))
        vq_model = vq_lib.VQModel(vq_lib.spec_from_config(cfg), jnp.float32)
        builder = sequences.SequenceBuilder.from_config(cfg, tokenizer)
        return cls(cfg, model, params, vq_model, vq_params, tokenizer, builder, sw.WorldConfig.from_config(cfg),
                   step, workdir)

    @classmethod
    def from_workdir(cls, workdir: str, *, step: int = -1, cfg=None, data_dir: str | None = None,
                     tokenizer=None) -> "UMMRun":
        """Restore a UMM run (EMA params when it has them) with the config saved in its checkpoint.
        The tokenizer is the run's dataset tokenizer (`data_dir` overrides where the data lives)."""
        loaded = restore.load_umm(workdir, step=step, cfg=cfg)
        if tokenizer is None:
            tokenizer = datasets.load_dataset_tokenizer(loaded.cfg, data_dir)
        builder = sequences.SequenceBuilder.from_config(loaded.cfg, tokenizer)
        return cls(loaded.cfg, loaded.model, loaded.params, loaded.vq_model, loaded.vq_params, tokenizer, builder,
                   sw.WorldConfig.from_config(loaded.cfg), loaded.step, workdir)

    # -- array helpers ------------------------------------------------------------------------
    def vit_pixels(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B,H,W,3] -> float32 [B,S,S,3] in [-1, 1] for the understanding ViT."""
        s = self.builder.layout.vit_image_size
        return np.stack([sequences.vit_pixels(im, s) for im in np.asarray(images)])

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B,H,W,3] -> int32 [B, N] ground-truth codes from the frozen VQ."""
        return np.asarray(_encode_fn(self.vq_model)(self.vq_params, jnp.asarray(images)))

    def decode_codes(self, codes) -> np.ndarray:
        return sampler_lib.decode_codes(self.vq_model, self.vq_params, codes)

    def map_batches(self, fn: Callable, make: Callable[[list], Any], items: Sequence[Any], batch_size: int):
        """Apply `fn(params, make(chunk))` over fixed-size chunks of `items` and concatenate the
        outputs (a pytree whose leaves have the batch on axis 0). The last chunk is padded by
        repeating its last item, so every call has the same shapes (one compile)."""
        items = list(items)
        if not items:
            raise ValueError("map_batches: no items")
        bs = max(1, min(int(batch_size), len(items)))
        outs = []
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (bs - n)
            res = jax.device_get(fn(self.params, make(chunk)))
            outs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], res))
        return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)

    # -- prompts for the sampler (laid out by sgt_jax.infer.prompts) -------------------------
    def _gen_prefix_len(self) -> int:
        """One fixed prompt length for every generation batch (room for N codes + <eoi>), so each
        sampler loop compiles once."""
        return self.builder.layout.max_seq_len - self.builder.layout.num_codes - 1

    def t2i_prefixes(self, prompts: Sequence[str]) -> tuple[dict, dict]:
        """(cond, uncond) prefixes `<bos> prompt <boi>` / `<bos> pads <boi>`, prompts cut as in training."""
        return prompts_lib.t2i_pair(self.builder, list(prompts), length=self._gen_prefix_len())

    def with_empty_spans(self, inputs: dict, codes: bool = False) -> dict:
        """Add absent image spans as empty ones (`*_start` = -1). The model splices nothing for them,
        so outputs are unchanged, but every batch has the same input structure (fewer compiles)."""
        out = dict(inputs)
        b = out["tokens"].shape[0]
        if "vit_images" not in out:
            s = self.builder.layout.vit_image_size
            out["vit_images"] = np.zeros((b, s, s, 3), np.float32)
            out["vit_start"] = np.full((b,), -1, np.int32)
        if codes and "codes" not in out:
            out["codes"] = np.zeros((b, self.builder.layout.num_codes), np.int32)
            out["gen_start"] = np.full((b,), -1, np.int32)
        return out

    def proxy_prefixes(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> tuple[dict, dict]:
        """(cond, uncond) SGT prefixes; the uncond row drops the instruction, never the image."""
        return prompts_lib.proxy_pair(self.builder, list(images), list(instructions), length=self._gen_prefix_len())

    def sample_images(self, cond: dict, uncond: dict, sampling: sampler_lib.SamplingConfig, rng) -> np.ndarray:
        """Codes with CFG (cond/uncond rows paired in one batch) decoded to uint8 images."""
        codes = sampler_lib.generate_codes(self.model, self.params, cond, self.builder.layout.num_codes, sampling,
                                           rng, uncond)
        return self.decode_codes(codes)

    def generate_answers(self, prompts: Sequence[str], images: Sequence[np.ndarray], *, max_new_tokens: int = 6,
                         batch_size: int = 16) -> list[str]:
        """Greedy text answers to `<bos> <img> [V] </img> prompt` (cached decoding)."""
        b = self.builder
        length = b.layout.max_seq_len - max_new_tokens
        greedy = sampler_lib.SamplingConfig(temperature=0.0)

        def make(chunk):
            return prompts_lib.vqa_prefixes(b, [img for _, img in chunk], [q for q, _ in chunk],
                                            answer_room=max_new_tokens, length=length)

        def fn(params, prefix):
            return sampler_lib.generate_text(self.model, params, prefix, max_new_tokens, b.ids.eos, greedy,
                                             jax.random.key(0))

        tokens = self.map_batches(fn, make, list(zip(prompts, images, strict=True)), batch_size)
        return prompts_lib.decode_text(self.tokenizer, tokens, b.ids.eos)
