"""Config for the toy regression stage used by the training-core subprocess tests.

Options (big_vision style arg): steps=N, every=N (checkpoint interval), mesh=dxfxt.
"""
from train_toy_stage import toy_config

from sgt_jax.config import parse_arg


def get_config(arg=None):
    opts = parse_arg(arg)
    cfg = toy_config(tensorboard=False)
    cfg.train.steps = int(opts.get("steps", cfg.train.steps))
    cfg.checkpoint.every_steps = int(opts.get("every", cfg.checkpoint.every_steps))
    if "mesh" in opts:
        cfg.mesh.shape = tuple(int(s) for s in str(opts["mesh"]).split("x"))
    return cfg
