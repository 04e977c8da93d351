"""Stage 2: post-training from the base UMM on Shapes World: SFT only, or SFT + an SGT proxy.

    python tools/train.py --config=configs/post_shapes.py:proxy=segmentation --workdir=runs/sgt_segmentation
    python tools/train.py --config=configs/post_shapes.py:proxy=none --workdir=runs/sft

`proxy=none` trains understanding only (the "+SFT only" row); any of segmentation | semantic |
depth | edge | reconstruction | mae mixes that proxy with understanding 2 : 1 by batch (the paper's
best ratio; `ratio=R` changes it). Everything but the VQ trains; constant lr after warmup;
loss = 1.5 x text CE + 1.0 x code CE; the instruction is dropped for 10% of proxy samples, the
input image never. The example budget comes from a budget of proxy-row positions, so SFT-only and
every proxy run train the same examples (and steps, at the same batch size); the row length is
derived from the mixed tasks by `sgt_jax.config.finalize`.

Options (OPTIONS): `proxy=NAME` (required), `base=PATH` (base workdir, default runs/base), `ratio=R`,
`steps=N`, `smoke`, `vqarg=A`, `quick` (as for base_shapes: the same model and data; the base's
mixture and step count are replaced here).
"""
from sgt_jax.config import PROXIES, ConfigError, config_module, format_arg, parse_arg, row_lengths

POST_POSITIONS = 200 * 32 * 160  # proxy-row positions of one post-training run (batch x steps x length)
OPTIONS = dict(proxy="", base="runs/base", ratio=2.0, steps=0, smoke=False, vqarg="", quick=False)


def _base():
    return config_module("base_shapes.py", __file__)


def get_config(arg=None):
    a = parse_arg(arg, **OPTIONS)
    if a.proxy not in ("none",) + PROXIES:
        raise ConfigError(f"post_shapes option 'proxy' = {a.proxy!r} is not allowed; allowed: {['none', *PROXIES]}")
    base = _base()
    c = base.get_config(format_arg({"smoke": a.smoke, "vqarg": a.vqarg, "quick": a.quick}, base.OPTIONS))
    c.init_from.path = a.base
    c.init_from.mapping = ""  # identity: UMM and frozen VQ both come from the base checkpoint

    c.data.mixture = ({"understanding": 1.0} if a.proxy == "none"
                      else {f"proxy_{a.proxy}": a.ratio, "understanding": 1.0})
    c.data.cond_dropout = 0.1  # instruction dropped; the input image never is
    c.data.text_loss_weight = 1.5
    c.data.gen_loss_weight = 1.0

    c.optim.schedule = "constant"
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 20
    c.train.num_examples = base.position_budget(POST_POSITIONS, row_lengths(c)["proxy_segmentation"])
    c.checkpoint.every_steps = 200
    if a.smoke:
        # Instructions and captions cut short (112-position rows): tests only check the plumbing.
        c.data.answer_room, c.data.instruction_room = 32, 16
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 1
        c.train.num_examples = 6 * c.train.batch_size
        c.checkpoint.every_steps = 100
    if a.steps:
        c.train.num_examples = a.steps * c.train.batch_size
    return c
