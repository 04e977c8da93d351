"""Proxy ablation on Shapes World: one sweep point = post_shapes(proxy) with its own seed.

The whole ablation (base / +SFT only / +edge / +reconstruction / +depth / +MAE / +semantic / +SGT
over 3 seeds, the segmentation mixing-ratio sweep and the equal-VQA-examples run, then the report
with intervals and paired tests) runs, resumably, from one command:

    python tools/ablation.py --out=results/shapes_ablation            # see tools/ablation.py

One point can be trained by hand:

    python tools/train.py --config=configs/ablation_shapes.py:proxy=depth,seed=1 --workdir=runs/ablation/depth_s1

Options of get_config (OPTIONS: configs/post_shapes.py's plus `seed` and `mixing`): `proxy=NAME`
(segmentation | semantic | depth | edge | reconstruction | mae | none), `seed=S` (train rng and data
order), `mixing=rows|batches` (`data.mixing`: how the 2 : 1 mixture is applied; default rows, the
ablation driver passes batches, as in the paper's code), `base=PATH`, `steps=N`, `ratio=R`, `smoke`,
`vqarg=A`.
"""
from __future__ import annotations

from sgt_jax.config import PROXIES, ConfigError, config_module, format_arg, parse_arg

ABLATION_PROXIES: tuple[str, ...] = PROXIES + ("none",)
NUM_SEEDS = 3
MIXING = ("rows", "batches")


def _post_shapes():
    return config_module("post_shapes.py", __file__)


def get_config(arg=None):
    """One sweep point: post_shapes(proxy) with `seed` setting the train rng and the data order."""
    post = _post_shapes()
    a = parse_arg(arg, seed=0, mixing="rows", **post.OPTIONS)
    if a.mixing not in MIXING:
        raise ConfigError(f"ablation_shapes option 'mixing' = {a.mixing!r} is not allowed; allowed: {list(MIXING)}")
    c = post.get_config(format_arg({k: v for k, v in a.items() if k not in ("seed", "mixing")}, post.OPTIONS))
    c.seed = a.seed
    c.data.shuffle_seed = a.seed
    c.data.mixing = a.mixing
    return c


def sweep(base: str = "runs/base", *, seeds: int = NUM_SEEDS, proxies=ABLATION_PROXIES, steps: int | None = None,
          smoke: bool = False, extra: str = "") -> list[dict]:
    """The sweep as a list of {name, proxy, seed, arg, config}: every proxy x seeds 0..seeds-1."""
    out = []
    for proxy in proxies:
        for seed in range(int(seeds)):
            parts = [f"proxy={proxy}", f"seed={seed}", f"base={base}"]
            if steps is not None:
                parts.append(f"steps={int(steps)}")
            if smoke:
                parts.append("smoke")
            if extra:
                parts.append(extra)
            arg = ",".join(parts)
            out.append({"name": f"{proxy}_s{seed}", "proxy": proxy, "seed": seed, "arg": arg,
                        "config": get_config(arg)})
    return out
