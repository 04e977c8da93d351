"""The schema's defaults (`sgt_jax.config.default_config()`), as a config file.

tools/evaluate.py reads it when no --config is given, so `--config.eval.umm.FIELD=VALUE` overrides
work on a UMM run evaluated with the config its checkpoint saved (one override syntax everywhere).
"""
from sgt_jax.config import default_config, parse_arg


def get_config(arg=None):
    parse_arg(arg)  # no options
    return default_config()
