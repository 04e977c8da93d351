"""How the text and code losses share the gradient in post-training (issue 12: measure the balance).

    python tools/grad_balance.py --base=runs/base --config=configs/post_shapes.py:proxy=segmentation,vqarg=f8 \
        [--batches=4] [--config.data.data_dir=runs/data] [--out=runs/grad_balance.json]

At the base checkpoint's params (EMA when it has them), on the first `--batches` training batches
of the post-training config, this prints per batch:
- |g_text|, |g_gen|: global gradient norms of the weighted text term and the weighted code term of
  the loss (`data.text_loss_weight` x token-mean text CE, `data.gen_loss_weight` x token-mean code
  CE), over the trainable UMM parameters (the frozen VQ is left out);
- their cosine, and |g_gen| / |g_text| (n/a for a batch without text loss, as whole-batch
  mixing gives: `--config.data.mixing=batches`);
- where the text-loss tokens come from: understanding rows whose loss covers <= 3 tokens are MCQ
  answers (a letter, its end token), longer ones are captions; the shares are of all text tokens.

The loss is a sum of per-batch token means, so these weights set the balance only together with the
token counts; this tool measures what they give. Nothing here changes the recipe.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from sgt_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Post-training config (path[:arg]).", lock_config=True)
_BASE = flags.DEFINE_string("base", None, "Base run workdir: the params the gradients are taken at.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Training batches to measure (the first ones of the run).")
_OUT = flags.DEFINE_string("out", "", "Optional JSON path for the per-batch rows.")
flags.mark_flags_as_required(["config", "base"])

MCQ_MAX_TOKENS = 3  # an understanding row with at most this many loss tokens is an MCQ answer


def balance_fn(stage):
    """jit(umm_params, vq_params, batch) -> (|g_text|, |g_gen|, cosine) of the stage's weighted loss terms."""
    import jax
    import jax.numpy as jnp
    import optax

    from sgt_jax.train.stages import umm_stage

    def term(umm_params, vq_params, batch, name):
        _, m = stage.losses({umm_stage.UMM_KEY: umm_params, umm_stage.VQ_KEY: vq_params}, batch)
        return m[name]

    @jax.jit
    def run(umm_params, vq_params, batch):
        g_text = jax.grad(term)(umm_params, vq_params, batch, "text_loss")
        g_gen = jax.grad(term)(umm_params, vq_params, batch, "gen_loss")
        dot = optax.tree.vdot(g_text, g_gen)
        nt, ng = optax.tree.norm(g_text), optax.tree.norm(g_gen)
        return nt, ng, dot / jnp.maximum(nt * ng, 1e-30)

    return run


def batch_row(run, umm_params, vq_params, batch, cfg, index: int = 0) -> dict:
    """One table row: gradient norms and cosine, and where the batch's text-loss tokens come from."""
    import numpy as np

    from sgt_jax.config import TASKS

    nt, ng, cos = (float(x) for x in run(umm_params, vq_params, batch))
    per_row = (np.asarray(batch["text_loss_weight"]) > 0).sum(1)
    task = np.asarray(batch["task"])
    und = task == TASKS.index("understanding")
    mcq, caption = und & (per_row <= MCQ_MAX_TOKENS), und & (per_row > MCQ_MAX_TOKENS)
    total = max(int(per_row.sum()), 1)
    return {"batch": index, "g_text": nt, "g_gen": ng, "cosine": cos, "gen_over_text": ng / nt if nt > 0 else None,
            "text_loss_weight": float(cfg.data.text_loss_weight), "gen_loss_weight": float(cfg.data.gen_loss_weight),
            "text_tokens": int(per_row.sum()), "code_tokens": int(np.asarray(batch["gen_loss_mask"]).sum()),
            "mcq_rows": int(mcq.sum()), "caption_rows": int(caption.sum()),
            "mcq_token_share": float(per_row[mcq].sum() / total),
            "caption_token_share": float(per_row[caption].sum() / total)}


def measure(cfg, base: str, batches: int) -> list[dict]:
    """Rows for the first `batches` training batches of `cfg`, at the params of the run in `base`."""
    import jax
    import jax.numpy as jnp

    from sgt_jax import checks
    from sgt_jax.train import loop, restore
    from sgt_jax.train.stages import umm_stage

    cfg = checks.prepare(cfg, jax.device_count())
    loaded = restore.load_umm(base, cfg=cfg)
    stage = umm_stage.UMMStage(cfg)
    run, spec = balance_fn(stage), stage.dummy_batch(1)
    it = loop.make_data_iterator(stage, cfg, "train")
    rows = []
    for i in range(batches):
        batch = {k: jnp.asarray(v) for k, v in next(it).items() if k in spec}
        rows.append(batch_row(run, loaded.params, loaded.vq_params, batch, cfg, i))
    return rows


def table(rows: list[dict]) -> str:
    head = ("| batch | g_text | g_gen | g_gen / g_text | cosine | text tokens | code tokens | MCQ rows | caption rows "
            "| MCQ share of text tokens | caption share |")
    out = [head, "|" + "---:|" * 11]
    for r in rows:
        ratio = "n/a" if r["gen_over_text"] is None else f"{r['gen_over_text']:.2f}"
        out.append(f"| {r['batch']} | {r['g_text']:.3g} | {r['g_gen']:.3g} | {ratio} | {r['cosine']:.3f} "
                   f"| {r['text_tokens']} | {r['code_tokens']} | {r['mcq_rows']} | {r['caption_rows']} "
                   f"| {100 * r['mcq_token_share']:.1f}% | {100 * r['caption_token_share']:.1f}% |")
    return "\n".join(out)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rows = measure(_CONFIG.value, _BASE.value, int(_BATCHES.value))
    print(table(rows))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(rows, f, indent=1)
    sys.exit(0)


if __name__ == "__main__":
    cli.run(main)
