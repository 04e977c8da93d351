"""Issue 10 speed suite (`tools/bench.py --suite=scale`): one run, every number side by side.

1. Train-step time of `configs/base_shapes.py` and of a 2-layer slice of `configs/umm_1b.py`
   (median of interleaved rounds; the "before" numbers are the lead's, measured at commit f1d12ac
   with the unrolled layers, which no longer exist).
2. Compile time of the full `configs/umm_1b.py` train step (abstract state, AOT, this CPU).
3. Tokens/s of one AdamW f32 train step of the same Qwen2-shaped causal LM in sgt_jax (scanned,
   fused attention, donated state) and in HF transformers + torch, interleaved step by step.
4. CFG image sampling (`sampler.generate_codes`, cond + uncond rows, KV cache) against HF
   `generate` with its KV cache on the same decoder shape and the same rows / prompt / new tokens.
   HF has no generation head: it samples text tokens from its LM head, and the guidance mix
   (u + s (c - u), negligible) is not applied there, so the comparison is decoder + cache cost.

`small=True` shrinks every size (one quick run proves the suite works); the real numbers come from
an idle machine with the default sizes.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class LMShape:
    """A Qwen2 decoder shape, given once to both frameworks."""

    vocab: int = 4096
    width: int = 256
    depth: int = 6
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    mlp: int = 1024  # 7.34M parameters with the tied embedding

    def hf_config(self):
        from transformers import Qwen2Config

        return Qwen2Config(vocab_size=self.vocab, hidden_size=self.width, intermediate_size=self.mlp,
                           num_hidden_layers=self.depth, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim, max_position_embeddings=4096,
                           tie_word_embeddings=True, attn_implementation="sdpa")


SMALL = LMShape(vocab=512, width=64, depth=2, heads=2, kv_heads=2, head_dim=32, mlp=128)


def _interleaved(*fns, rounds: int) -> list[list[float]]:
    """Wall seconds of each of `fns`, called in turn `rounds` times (noise hits all); each
    timed call follows an untimed call of the same function. The first call after the other
    framework ran is slow (measured: sgt_jax's LM step 2947 ms right after two torch steps, then
    1500 ms, against 1527 ms before torch ran), so timing every call straight after a switch would
    charge that to whichever runs second."""
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, times in zip(fns, out, strict=True):
            fn()  # re-warm after the switch
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return out


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def jax_lm_runner(cfg, tokens_np, *, warmup: int = 2, seed: int = 0):
    """sgt_jax's AdamW f32 train step of `CausalLM(cfg)` on fixed tokens (donated state) ->
    (call() running one step, compile seconds, number of parameters)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import linen as nn

    from sgt_jax.models.llm import CausalLM

    model = CausalLM(cfg)
    tokens = jnp.asarray(tokens_np)
    tx = optax.adamw(1e-4)

    def loss_fn(p, t):
        logits = model.apply({"params": p}, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def jax_step(p, o, t):
        loss, grads = jax.value_and_grad(loss_fn)(p, t)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    params = jax.jit(lambda k: nn.unbox(model.init(k, tokens[:1])["params"]))(jax.random.key(seed))
    state = [params, jax.jit(tx.init)(params)]

    def call():
        state[0], state[1], loss = jax_step(state[0], state[1], tokens)
        jax.block_until_ready(loss)

    t0 = time.perf_counter()
    call()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        call()
    return call, compile_s, sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def torch_lm_step(shape: LMShape, tokens_np, *, seed: int = 0):
    """HF Qwen2ForCausalLM's AdamW train step on the same tokens -> step() (returns the loss)."""
    import numpy as np
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    tmodel = Qwen2ForCausalLM(shape.hf_config()).train()
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4)
    ttokens = torch.from_numpy(np.asarray(tokens_np).astype(np.int64))

    def torch_step():
        loss = tmodel(input_ids=ttokens, labels=ttokens).loss
        loss.backward()
        topt.step()
        topt.zero_grad(set_to_none=True)
        return loss.item()

    return torch_step


def lm_tokens(shape: LMShape, batch: int, seq: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, shape.vocab, (batch, seq)).astype(np.int32)


def llm_vs_torch(shape: LMShape, *, batch: int, seq: int, steps: int, warmup: int = 2, seed: int = 0) -> dict:
    """Interleaved AdamW train steps (f32) of sgt_jax's CausalLM, as converted (layers scanned) and
    with `scan_unroll=depth` (the same parameters, compiled unrolled), and HF Qwen2ForCausalLM."""
    import dataclasses

    import torch

    from sgt_jax.convert.hf_qwen2 import llm_config_from_hf

    cfg = llm_config_from_hf(shape.hf_config().to_dict())
    tokens_np = lm_tokens(shape, batch, seq, seed)
    torch_step = torch_lm_step(shape, tokens_np, seed=seed)
    jax_call, compile_s, n_params = jax_lm_runner(cfg, tokens_np, warmup=warmup, seed=seed)
    unrolled_call, unrolled_compile_s, _ = jax_lm_runner(dataclasses.replace(cfg, scan_unroll=cfg.depth), tokens_np,
                                                         warmup=warmup, seed=seed)
    for _ in range(warmup):
        torch_step()
    tt, jt, ut = _interleaved(torch_step, jax_call, unrolled_call, rounds=steps)
    tok = batch * seq
    return {"params": n_params, "batch": batch, "seq": seq, "steps": steps, "jax_ms": _median_ms(jt),
            "torch_ms": _median_ms(tt), "jax_tok_s": tok / statistics.median(jt),
            "torch_tok_s": tok / statistics.median(tt), "ratio": statistics.median(tt) / statistics.median(jt),
            "unrolled_ms": _median_ms(ut), "unrolled_ratio": statistics.median(tt) / statistics.median(ut),
            "jax_compile_s": compile_s, "unrolled_compile_s": unrolled_compile_s,
            "torch_threads": torch.get_num_threads()}


def sampler_config(shape: LMShape, *, prompt_len: int, num_codes: int):
    """A UMM config with `shape`'s decoder, sized for `num_codes` codes after `prompt_len` prompt tokens."""
    from sgt_jax import config as config_lib

    cfg = config_lib.default_config()
    cfg.stage = "umm"
    u = cfg.model.umm
    u.llm.update(dict(vocab_size=shape.vocab, width=shape.width, depth=shape.depth, num_heads=shape.heads,
                      num_kv_heads=shape.kv_heads, head_dim=shape.head_dim, mlp_dim=shape.mlp, attn_bias=True,
                      tied_embeddings=True))
    grid = int(round(num_codes ** 0.5))
    if grid * grid != num_codes:
        raise ValueError(f"num_codes must be a square (a code grid); got {num_codes}")
    cfg.data.image_size = grid * cfg.model.vq.downsample  # finalize derives num_codes = grid^2
    cfg.data.mixture = {"t2i": 1.0}
    cfg.data.prompt_room = max(prompt_len, 1)  # rows of prompt + codes + structural tokens (derived)
    return cfg


def sampler_vs_hf(shape: LMShape, *, images: int, prompt_len: int, num_codes: int, rounds: int, seed: int = 0) -> dict:
    """CFG code sampling (2 rows per image) vs HF `generate` (KV cache) on 2 x images rows."""
    import bench_lib as bench  # tools/bench_lib.py
    import numpy as np
    import torch
    from transformers import Qwen2ForCausalLM

    cfg = sampler_config(shape, prompt_len=prompt_len, num_codes=num_codes)
    call, compile_s, n = bench.sampler_runner(cfg, batch=images, prompt_len=prompt_len, guidance=True, seed=seed)

    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(shape.hf_config()).eval()
    rows = 2 * images
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(1, shape.vocab, (rows, prompt_len)).astype(np.int64))
    mask = torch.ones_like(ids)
    mask[1::2, : prompt_len // 2] = 0  # rows of different lengths (left-padded for HF)

    def hf_call():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=num_codes, min_new_tokens=num_codes,
                               do_sample=True, use_cache=True, pad_token_id=0, top_k=0)

    hf_call()
    ht, jt = _interleaved(hf_call, call, rounds=rounds)
    return {"images": images, "rows": rows, "prompt_len": prompt_len, "num_codes": n, "rounds": rounds,
            "jax_s": statistics.median(jt), "hf_s": statistics.median(ht),
            "jax_img_s": images / statistics.median(jt), "hf_img_s": images / statistics.median(ht),
            "ratio": statistics.median(ht) / statistics.median(jt), "jax_compile_s": compile_s}


def umm_compile_seconds(cfg) -> dict:
    """AOT compile time of a config's full train step on abstract (unallocated) state."""
    import bench_lib as bench  # tools/bench_lib.py

    t0 = time.perf_counter()
    built = bench.build(cfg, materialize=False)
    build_s = time.perf_counter() - t0
    with built.context():
        t0 = time.perf_counter()
        built.jstep.lower(*built.abstract_inputs()).compile()
        compile_s = time.perf_counter() - t0
    return {"params": built.n_params, "build_s": build_s, "compile_s": compile_s,
            "depth": int(cfg.model.umm.llm.depth), "remat": str(cfg.train.get("remat_policy", "") or cfg.train.remat),
            "attention": str(cfg.model.umm.llm.attention)}


def train_step_rows(named: list[tuple[str, Any]], *, steps: int, warmup: int):
    """The real train step of each config, timed round-robin (tools/bench.py's machinery)."""
    import bench_lib as bench  # tools/bench_lib.py

    runners = [bench.make_runner(cfg, name=name) for name, cfg in named]
    bench.time_interleaved(runners, warmup=warmup, rounds=steps)
    return bench.summarize(runners)


def scale_specs(small: bool) -> tuple[list[tuple[str, str, list[tuple[str, Any]]]], tuple[str, list]]:
    """(train-step variants as (name, config spec, overrides), the compile config): base_shapes and
    a 2-layer slice of umm_1b on one device; umm_1b whole for the compile time."""
    one = [("mesh.shape", (1, -1, 1)), ("optim.grad_accum_steps", 1)]
    full = "configs/umm_1b.py:smoke" if small else "configs/umm_1b.py"
    slice2 = [("model.umm.llm.depth", 2), ("model.umm.vit.depth", 2), ("train.batch_size", 2)] + one
    base = [("train.batch_size", 2)] if small else []
    return [("base_shapes", "configs/base_shapes.py", base), ("umm_1b_2layer", full, slice2)], (full, one)


def _load(spec: str, overrides):
    import bench_lib as bench  # tools/bench_lib.py

    from sgt_jax.config import load_config

    return bench.apply_overrides(load_config(spec), overrides)


def before_step_seconds(src: str, specs, *, steps: int, warmup: int, cache_dir: str = "") -> dict[str, dict]:
    """Each variant's step timed by another checkout's own tools/bench.py (e.g. a worktree at f1d12ac,
    the unrolled layers), in a subprocess with that checkout on PYTHONPATH -> {variant: its bench row
    + when it ran}. With `cache_dir`, each result is kept as CACHE/<variant>.json and reused by a later
    run with the same steps and warm-up (the old umm_1b slice takes ~200 s a step here), so a suite
    that fails later does not have to time the old code again."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec, overrides in specs:
            cached = os.path.join(cache_dir, name + ".json") if cache_dir else ""
            if cached and os.path.exists(cached):
                with open(cached) as f:
                    got = json.load(f)
                if got["rows"][0].get("n") == steps and got.get("warmup") == warmup:
                    out[name] = {**got["rows"][0], "date": got["env"]["date"], "reused": cached}
                    continue
            path, _, arg = spec.partition(":")
            variant = name + (":" + ",".join(f"{k}={v!r}" for k, v in overrides) if overrides else "")
            dst = os.path.join(tmp, name)
            cmd = [sys.executable, os.path.join(src, "tools", "bench.py"),
                   f"--config={os.path.join(src, path)}" + (f":{arg}" if arg else ""), f"--variant={variant}",
                   f"--steps={steps}", f"--warmup={warmup}", f"--out={dst}"]
            env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
            subprocess.run(cmd, env=env, cwd=src, check=True)
            with open(dst + ".json") as f:
                got = dict(json.load(f), warmup=warmup)
            if cached:
                os.makedirs(cache_dir, exist_ok=True)
                with open(cached, "w") as f:
                    json.dump(got, f, indent=1)
            out[name] = {**got["rows"][0], "date": got["env"]["date"]}
    return out


def run(small: bool = False, steps: int = 5, warmup: int = 1, before_src: str = "", cache_dir: str = "",
        fast_steps: int = 0, emit=print, step_variants=None) -> tuple[dict, str]:
    """Every measurement of the suite -> (json payload, markdown text). `before_src`: a checkout of
    the old code (e.g. f1d12ac) whose own bench times the same train-step variants first (kept in
    `cache_dir` when given). `fast_steps` (default max(steps, 10)): rounds of the millisecond-scale
    LM and sampler comparisons. Each section goes to `emit` as soon as it is measured, so a failure
    later in the suite keeps what was measured before it. `step_variants`: the train-step variants
    to time (default: all of `scale_specs`); an unknown name is a ValueError before anything runs."""
    import bench_lib as bench  # tools/bench_lib.py

    fast = fast_steps or max(steps, 10)
    sections: list[str] = []
    specs, (full_spec, full_over) = scale_specs(small)
    if step_variants is not None:
        unknown = sorted(set(step_variants) - {name for name, _, _ in specs})
        if unknown:
            raise ValueError(f"step variants {unknown} are not known; allowed: {[name for name, _, _ in specs]}")
        specs = [sp for sp in specs if sp[0] in step_variants]

    def section(text: str) -> None:
        sections.append(text)
        emit(text + "\n")

    shape = SMALL if small else LMShape()
    lm = llm_vs_torch(shape, batch=4 if small else 32, seq=32 if small else 160, steps=fast, warmup=warmup)
    section("## Qwen2-shaped LM, AdamW f32 train step: sgt_jax vs HF transformers + torch (interleaved)\n"
            + bench.markdown_table(
                ("sgt_jax layers", "params", "B x S", "steps", "sgt_jax ms", "torch ms", "sgt_jax tok/s",
                 "torch tok/s", "x torch", "goal"),
                [(name, f"{lm['params']:,}", f"{lm['batch']} x {lm['seq']}", lm["steps"], f"{lm[ms]:.1f}",
                  f"{lm['torch_ms']:.1f}", f"{lm['batch'] * lm['seq'] / lm[ms] * 1e3:.0f}", f"{lm['torch_tok_s']:.0f}",
                  f"{lm[ratio]:.2f}", ">= 1.3")
                 for name, ms, ratio in (("scanned (as converted)", "jax_ms", "ratio"),
                                         ("scan_unroll=depth", "unrolled_ms", "unrolled_ratio"))]))
    smp = sampler_vs_hf(shape, images=2 if small else 16, prompt_len=16 if small else 96,
                        num_codes=16 if small else 64, rounds=max(1, fast // 2) if small else fast)
    section("## CFG image sampling (KV cache): sgt_jax generate_codes vs HF generate\n" + bench.markdown_table(
        ("images", "rows", "prompt", "codes", "rounds", "sgt_jax s", "HF s", "sgt_jax img/s", "HF img/s",
         "x HF", "goal"),
        [(smp["images"], smp["rows"], smp["prompt_len"], smp["num_codes"], smp["rounds"], f"{smp['jax_s']:.3f}",
          f"{smp['hf_s']:.3f}", f"{smp['jax_img_s']:.2f}", f"{smp['hf_img_s']:.2f}", f"{smp['ratio']:.2f}",
          ">= 2")]))
    before = (before_step_seconds(before_src, specs, steps=steps, warmup=warmup, cache_dir=cache_dir)
              if before_src else {})
    comp = umm_compile_seconds(_load(full_spec, full_over))
    section("## compile time of the umm_1b train step (AOT, abstract state, this CPU)\n" + bench.markdown_table(
        ("config", "params", "depth", "remat", "attention", "build s", "compile s", "goal"),
        [("umm_1b" + (" smoke" if small else ""), f"{comp['params']:,}", comp["depth"], comp["remat"],
          comp["attention"], f"{comp['build_s']:.1f}", f"{comp['compile_s']:.1f}", "<= 60 s")]))
    rows = train_step_rows([(name, _load(spec, over)) for name, spec, over in specs], steps=steps, warmup=warmup)
    section("## train step after (this checkout)\n" + bench.bench_table(rows))
    b = {k: v["step_s_median"] for k, v in before.items()}
    when = "; ".join(f"{k}: {v['date']}" + (" (reused from the cache)" if v.get("reused") else "")
                     for k, v in before.items())
    section(f"## train step before ({before_src or 'not measured: pass --before_src=<checkout of f1d12ac>'}"
            + (f"; timed {when}" if when else "") + ") vs after\n" + bench.markdown_table(
                ("variant", "before ms", "after ms", "x faster"),
                [(r.variant, f"{1e3 * b[r.variant]:.1f}" if r.variant in b else "-", f"{1e3 * r.step_s_median:.1f}",
                  f"{b[r.variant] / r.step_s_median:.2f}" if r.variant in b else "-") for r in rows]))
    payload = {"small": small, "train_step": [r.as_dict() for r in rows], "before": before,
               "before_src": before_src, "compile": comp, "lm_vs_torch": lm, "sampler_vs_hf": smp}
    return payload, "\n\n".join(sections)
