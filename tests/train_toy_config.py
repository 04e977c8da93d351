"""Config for the toy regression stage used by the training-core subprocess tests.

Options (typed, big_vision style arg): steps=N, every=N (checkpoint interval), mesh=dxfxt.
"""
from train_toy_stage import toy_config

from sgt_jax.config import parse_arg


def get_config(arg=None):
    cfg = toy_config(tensorboard=False)
    opts = parse_arg(arg, steps=cfg.train.steps, every=cfg.checkpoint.every_steps, mesh="")
    cfg.train.steps = opts.steps
    cfg.checkpoint.every_steps = opts.every
    if opts.mesh:
        cfg.mesh.shape = tuple(int(s) for s in opts.mesh.split("x"))
    return cfg
