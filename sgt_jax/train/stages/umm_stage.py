"""Stage "umm": base pretraining and SGT post-training of the unified model with a frozen VQ.

Params are `{"umm": <UMM params>, "vq": <VQ params>}`. The VQ sits in the train state (so a UMM
checkpoint is self-contained for sampling and for the next stage) but is always frozen: it is
matched by `frozen`, gets no optimizer moments and stays bitwise unchanged. A fresh base run loads
it from the VQ stage with `init_from.path=<vq workdir>`, `init_from.mapping="->vq"`; a post-training
run loads everything from the base run with the identity mapping.

Inside the jitted step the target images of the batch are tokenized by the frozen VQ encoder under
`stop_gradient` (no pre-tokenization pass), spliced into the sequence at `gen_start`, and the loss is

    loss = sum_p w_text[p] * CE_text[p] / #{w_text > 0}  +  gen_weight * mean_{gen positions} CE_code

i.e. 1.5 x (mean answer-token CE) + 1.0 x (mean code CE) with the default weights (SGT recipe);
`w_text` comes from the data (`sequences.py` writes the text weight into `text_loss_weight`).
Per-task metrics are the unweighted mean CE over that task's loss tokens (NaN on a step whose
batch holds no example of the task).
"""
from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.data import datasets, pipeline, sequences, tokenizer
from sgt_jax.data.mixture import Mixture
from sgt_jax.models import umm as umm_lib
from sgt_jax.models import vq as vq_lib
from sgt_jax.models.vit import vit_flops_per_image
from sgt_jax.train.metrics import Ratio
from sgt_jax.train.stage import BaseStage, register_stage

log = logging.getLogger(__name__)

VQ_KEY, UMM_KEY = "vq", "umm"


def _short(task: str) -> str:
    return task.replace("proxy_", "")


@register_stage("umm")
class UMMStage(BaseStage):
    """Stage protocol implementation for the Janus-style UMM (see module docstring)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mcfg = umm_lib.UMMConfig.from_config(cfg)
        self.model = umm_lib.UMM(self.mcfg)
        # The frozen tokenizer always runs in float32 so the codes it assigns here are exactly the
        # codes the evaluators and the sampler's decoder see.
        self.vq = vq_lib.VQModel(vq_lib.spec_from_config(cfg), jnp.float32)
        self.layout = sequences.Layout.from_config(cfg)
        if self.layout.num_vit_tokens != self.mcfg.num_vit_tokens or self.layout.num_codes != self.mcfg.num_codes:
            raise ValueError(f"sequence layout {self.layout} disagrees with the model config {self.mcfg}")
        frozen = [f"^{VQ_KEY}/"]
        if cfg.model.umm_stage.freeze_vit:
            frozen.append(f"^{UMM_KEY}/vit/")
        self.frozen = tuple(frozen)
        self.mixture = Mixture.from_config(cfg)  # the one reader of data.mixture; transforms bound on first use
        # Packed rows (data.packing): up to this many examples per row, each with its own image slots.
        self.max_segments = int(cfg.data.packing_max_segments) if cfg.data.get("packing", False) else 0

    # -- shapes --------------------------------------------------------------------------------
    def dummy_batch(self, batch_size: int) -> dict[str, Any]:
        return {k: np.zeros((batch_size,) + shape, dtype)
                for k, (shape, dtype) in sequences.example_spec(self.layout, self.max_segments).items()}

    def tokens_per_example(self) -> float:
        return float(self.layout.max_seq_len)

    # -- params ----------------------------------------------------------------------------------
    def init(self, rng, example_batch):
        one = {k: jnp.zeros((1,) + tuple(v.shape[1:]), v.dtype) for k, v in example_batch.items()}
        inputs = self._model_inputs(one, jnp.zeros((1, max(1, self.max_segments) * self.mcfg.num_codes), jnp.int32))
        r_umm, r_vq = jax.random.split(rng)
        umm_params = self.model.init(r_umm, inputs)["params"]
        vq_params = vq_lib.init_params(self.vq, r_vq)
        return {UMM_KEY: umm_params, VQ_KEY: vq_params}, {}

    # -- loss --------------------------------------------------------------------------------
    def tokenize_targets(self, vq_params, target_image) -> jax.Array:
        """uint8 [B,H,W,3] -> int32 [B, N] codes from the frozen VQ (no gradient); packed rows'
        [B,K,H,W,3] -> [B, K * N] (slot k's codes at k * N ...)."""
        b = target_image.shape[0]
        images = target_image.reshape((-1,) + target_image.shape[-3:]).astype(jnp.float32) / 127.5 - 1.0
        codes = vq_lib.encode(self.vq, jax.lax.stop_gradient(vq_params), images)
        return jax.lax.stop_gradient(codes.reshape(b, -1))

    @staticmethod
    def _model_inputs(batch, codes) -> dict:
        inputs = {"tokens": batch["tokens"], "attn_mask": batch["attn_mask"], "vit_images": batch["vit_image"],
                  "vit_start": batch["vit_start"], "codes": codes, "gen_start": batch["gen_start"]}
        inputs.update({k: batch[k] for k in ("segment_ids", "positions") if k in batch})  # packed rows
        return inputs

    def losses(self, params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Forward + loss on one batch -> (scalar loss, scalar metrics). Shared by training and eval.

        The model computes the cross-entropies itself (`UMM._target_losses`): the LM head sequence-
        tiled, the generation head only at the N positions that predict a code (<boi> .. last-but-one
        code), so neither full logits tensor is built.
        """
        codes = self.tokenize_targets(params[VQ_KEY], batch["target_image"])
        tokens = batch["tokens"]
        b, length = tokens.shape
        # One row = one example, or (packed) up to K examples in segments 1..K with K slots each of
        # gen_start / task / truncated; unpacked rows are the K = 1 case of the same arithmetic.
        packed = batch["gen_start"].ndim == 2
        gen_start = batch["gen_start"] if packed else batch["gen_start"][:, None]  # [B, K]
        task = batch["task"] if packed else batch["task"][:, None]  # [B, K], -1 = empty slot
        k_slots = gen_start.shape[1]
        n = codes.shape[1] // k_slots
        seg = batch["segment_ids"] if "segment_ids" in batch else jnp.ones_like(tokens)
        task_at = jnp.take_along_axis(task, jnp.clip(seg - 1, 0, k_slots - 1), axis=1)  # [B, L] task per position
        # Targets of position p: the text token at p+1; slot k's code i is predicted at gen_start[k] - 1 + i.
        text_tgt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
        code_pos = (gen_start[:, :, None] - 1 + jnp.arange(n)[None, None, :]).reshape(b, k_slots * n)
        code_ok = jnp.repeat(gen_start >= 1, n, axis=1)  # slots without a code span score nothing
        code_task = jnp.repeat(task, n, axis=1)
        w = batch["text_loss_weight"].astype(jnp.float32)
        targets = {"text": text_tgt, "code_positions": code_pos, "codes": codes}
        n_all_text = jnp.sum(w > 0)
        k = int(self.cfg.model.umm.text_loss_positions)
        if 0 < k < length:  # the LM head runs on the first k loss positions of each row only
            text_pos = jnp.argsort(jnp.where(w > 0, 0, 1), axis=1, stable=True)[:, :k]
            targets.update(text=jnp.take_along_axis(text_tgt, text_pos, axis=1), text_positions=text_pos)
            w = jnp.take_along_axis(w, text_pos, axis=1)
            task_at = jnp.take_along_axis(task_at, text_pos, axis=1)
        out = self.model.apply({"params": params[UMM_KEY]}, self._model_inputs(batch, codes), deterministic=False,
                               targets=targets, loss_chunk=int(self.cfg.model.umm.loss_chunk))
        text_ce, gen_ce = out["text_ce"], out["gen_ce"]
        text_m = (w > 0).astype(jnp.float32)
        in_row = code_ok & (code_pos >= 0) & (code_pos < length)
        gen_m = jnp.take_along_axis(batch["gen_loss_mask"].astype(jnp.float32), jnp.clip(code_pos, 0, length - 1),
                                    axis=1) * in_row
        n_text, n_gen = jnp.sum(text_m), jnp.sum(gen_m)
        text_loss = jnp.sum(w * text_ce) / jnp.maximum(n_text, 1.0)
        gen_loss = float(self.layout.gen_weight) * jnp.sum(gen_m * gen_ce) / jnp.maximum(n_gen, 1.0)
        loss = text_loss + gen_loss

        text_hit = out["text_hit"].astype(jnp.float32)
        gen_hit = out["gen_hit"].astype(jnp.float32)
        metrics = {
            "text_loss": text_loss, "gen_loss": gen_loss,
            "text_ce": jnp.sum(text_m * text_ce) / jnp.maximum(n_text, 1.0),
            "gen_ce": jnp.sum(gen_m * gen_ce) / jnp.maximum(n_gen, 1.0),
            "text_acc": jnp.sum(text_m * text_hit) / jnp.maximum(n_text, 1.0),
            "gen_acc": jnp.sum(gen_m * gen_hit) / jnp.maximum(n_gen, 1.0),
            "text_tokens": n_text / b, "gen_tokens": n_gen / b,
            # text-loss positions past model.umm.text_loss_positions in a row (0 when it is sized right)
            "text_loss_dropped": (n_all_text - n_text) / b,
            "truncated": jnp.sum(batch["truncated"] * (task >= 0)) / jnp.maximum(jnp.sum(task >= 0), 1),
            "examples_per_row": jnp.sum(task >= 0) / b,
            "seq_fill": jnp.mean(batch["attn_mask"].astype(jnp.float32)),
        }
        # Per task: unweighted mean CE over that task's loss positions (text or code), as (sum, count)
        # so micro-batches and eval batches combine into the token mean (NaN only with no such token).
        # Each loss position belongs to its segment's task (text: task_at; codes: the slot's task).
        n_examples = jnp.maximum(jnp.sum(task >= 0), 1)
        for name, task_id in zip(self.mixture.tasks, self.mixture.ids, strict=True):
            st, sg = (task_at == task_id).astype(jnp.float32), (code_task == task_id).astype(jnp.float32)
            metrics[f"loss/{_short(name)}"] = Ratio(jnp.sum(st * text_m * text_ce) + jnp.sum(sg * gen_m * gen_ce),
                                                    jnp.sum(st * text_m) + jnp.sum(sg * gen_m))
            metrics[f"frac/{_short(name)}"] = jnp.sum(task == task_id) / n_examples
        return loss, metrics

    def loss_fn(self, params, model_state, batch, rng, step):
        del rng, step  # the model has no dropout; data randomness lives in the pipeline
        loss, metrics = self.losses(params, batch)
        return loss, (metrics, model_state)

    # -- FLOPs ----------------------------------------------------------------------------------
    def flops_per_example(self) -> float:
        """Training FLOPs of one row (a packed row: per image slot for the image parts): 3 x forward for trained parts (decoder over all L positions, LM
        head over the gathered text-loss positions, generation head over the code positions, ViT + adapter, code adapter), 1 x
        forward for a frozen ViT, plus the frozen VQ encoder's forward once (counted by XLA's cost
        analysis of the lowered encoder)."""
        c, L = self.mcfg, self.layout.max_seq_len
        slots = max(1, self.max_segments)  # a packed row runs the ViT, code adapter and VQ on every slot
        llm = umm_lib.flops_per_row(c, L, int(self.cfg.model.umm.text_loss_positions), slots)
        vit = vit_flops_per_image(c.vit) + 2 * c.num_vit_tokens * (c.vit.width * c.und_adapter_dim
                                                                    + c.und_adapter_dim * c.llm.width)
        gen_in = 2 * c.num_codes * (c.gen_embed_dim * c.gen_adapter_dim + c.gen_adapter_dim * c.llm.width)
        vit_mult = 1.0 if self.cfg.model.umm_stage.freeze_vit else 3.0
        return float(3.0 * (llm + slots * gen_in) + slots * (vit_mult * vit + self._vq_encoder_flops()))

    def _vq_encoder_flops(self) -> float:
        if not hasattr(self, "_vq_flops"):
            s = self.vq.spec
            try:
                params = nn.meta.unbox(jax.eval_shape(lambda: vq_lib.init_params(self.vq, jax.random.key(0))))
                images = jax.ShapeDtypeStruct((1, s.image_size, s.image_size, 3), jnp.float32)
                cost = jax.jit(lambda p, x: vq_lib.encode(self.vq, p, x)).lower(params, images).cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                self._vq_flops = float(cost.get("flops", 0.0))
            except Exception as e:  # cost analysis is backend-dependent; MFU then omits the VQ
                log.warning("VQ encoder FLOPs unavailable (%s); MFU counts the UMM only", e)
                self._vq_flops = 0.0
        return self._vq_flops

    # -- data -------------------------------------------------------------------------------------
    def record_source(self, split: str):
        """Records to read: None = the built dataset split (`datasets.open_source`). Subclasses
        (tests, custom data) return a `pipeline.RecordSource` or one per task."""
        return None

    def make_iterator(self, split: str, *, process_index: int, process_count: int, seed: int, **_):
        """The shared grain pipeline over `record_source(split)` with this stage's task transforms;
        the Shapes World dataset and tokenizer are built on first use, as the VQ stage does."""

        sources = self.record_source(split)
        if sources is None:
            datasets.ensure_dataset(self.cfg)
        return pipeline.make_iterator(self.cfg, split, self.example_transform(split), process_index=process_index,
                                      process_count=process_count, seed=seed, sources=sources)

    def example_transform(self, split: str) -> Mixture:
        """The run's mixture with one sequence transform per task (built once, same for every split)."""

        if self.mixture.transforms is None:
            tok = datasets.load_dataset_tokenizer(self.cfg)
            tokenizer.check_vocab_covers(tok, self.mcfg.llm.vocab_size, datasets.tokenizer_dir_for(self.cfg))
            self.mixture = sequences.make_task_transforms(self.cfg, tok)
        return self.mixture

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, params, model_state, *, step, workdir) -> dict[str, float]:
        """Held-out loss: the training loss and per-task CE on `cfg.eval.num_examples` rows of
        `cfg.eval.split` (one ordered pass, same task mixture and transforms as training; 0 = off).
        Sampling-based benchmarks (CV-Bench / GenEval analogues) live in `sgt_jax.eval`."""

        if int(self.cfg.eval.num_examples) <= 0:
            return {}
        split = self.cfg.eval.split
        batch_size = int(self.cfg.train.batch_size)
        n_batches = max(1, int(self.cfg.eval.num_examples) // batch_size)
        # Every process reads the same rows (they are small and replicated under jit).
        it = pipeline.make_iterator(self.cfg, split, self.example_transform(split), process_index=0,
                                    process_count=1, seed=int(self.cfg.data.shuffle_seed), batch_size=batch_size,
                                    training=False, sources=self.record_source(split))
        if not hasattr(self, "_eval_fn"):
            self._eval_fn = jax.jit(self.losses)  # compiled once per stage, reused every evaluation
        fn = self._eval_fn
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for i, batch in enumerate(it):
            if i >= n_batches:
                break
            batch = {k: v for k, v in batch.items() if k in self.dummy_batch(1)}
            loss, metrics = jax.device_get(fn(params, batch))
            for k, v in {"loss": loss, **metrics}.items():
                if isinstance(v, Ratio):  # token totals: the mean over all eval tokens of the task
                    sums[k] = sums.get(k, 0.0) + float(v.total)
                    counts[k] = counts.get(k, 0) + float(v.count)
                    continue
                v = float(v)
                if np.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        return {f"eval/{k}": sums[k] / counts[k] for k in sums if not k.startswith("frac/") and counts[k] > 0}
