"""Stage 2: post-training from the base UMM on Shapes World: SFT only, or SFT + an SGT proxy.

    python tools/train.py --config=configs/post_shapes.py:proxy=segmentation --workdir=runs/sgt_segmentation
    python tools/train.py --config=configs/post_shapes.py:proxy=none --workdir=runs/sft

`proxy=none` trains understanding only (the "+SFT only" row); any of segmentation | semantic |
depth | edge | reconstruction | mae mixes that proxy with understanding 2 : 1 by batch (the paper's
best ratio; `ratio=R` changes it). Everything but the VQ trains; constant lr after warmup;
loss = 1.5 x text CE + 1.0 x code CE; the instruction is dropped for 10% of proxy samples, the
input image never. The step count comes from a budget of proxy-row positions, so SFT-only and
every proxy run train the same number of steps at the same batch size.

Options: `proxy=NAME` (required), `base=PATH` (base workdir, default runs/base), `ratio=R`,
`steps=N`, `smoke`, `vqarg=A` (as for base_shapes).
"""

from sgt_jax.config import PROXIES, config_module, parse_arg

POST_POSITIONS = 200 * 32 * 160  # proxy-row positions of one post-training run (batch x steps x length)


def _base():
    return config_module("base_shapes.py", __file__)


def get_config(arg=None):
    a = parse_arg(arg)
    proxy = str(a.get("proxy", ""))
    if proxy not in ("none",) + PROXIES:
        raise ValueError(f"post_shapes option 'proxy' = {proxy!r} is not allowed; allowed: {['none', *PROXIES]}")
    smoke = bool(a.get("smoke", False))
    base = _base()
    c = base.get_config(",".join(p for p in ("smoke" if smoke else "", f"vqarg={a['vqarg']}" if "vqarg" in a else "")
                                 if p))
    c.init_from.path = str(a.get("base", "runs/base"))
    c.init_from.mapping = ""  # identity: UMM and frozen VQ both come from the base checkpoint

    ratio = float(a.get("ratio", 2.0))
    c.data.mixture = {"understanding": 1.0} if proxy == "none" else {f"proxy_{proxy}": ratio, "understanding": 1.0}
    c.data.cond_dropout = 0.1  # instruction dropped; the input image never is
    lengths = base.row_lengths(c)
    c.data.max_seq_len = base.round_up(lengths["understanding"] if proxy == "none"
                                       else max(lengths["understanding"], lengths["proxy"]))
    c.data.text_loss_weight = 1.5
    c.data.gen_loss_weight = 1.0

    c.optim.schedule = "constant"
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 20
    c.train.steps = max(50, POST_POSITIONS // (c.train.batch_size * base.round_up(lengths["proxy"])))
    c.checkpoint.every_steps = 200
    if smoke:
        c.data.max_seq_len = 112  # instructions and captions cut short: tests only check the plumbing
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 1
        c.train.steps = 6
        c.checkpoint.every_steps = 100
    if "steps" in a:
        c.train.steps = int(a["steps"])
    return c
