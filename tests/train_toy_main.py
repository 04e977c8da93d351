"""tools/train.py for the toy stage (the toy stage is not a registered config stage)."""
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory")
_NAN = flags.DEFINE_list("nan_steps", [], "steps whose loss is made NaN")


def main(argv):
    from train_toy_stage import ToyStage

    from sgt_jax.train import loop
    cfg = _CONFIG.value
    sys.exit(loop.run(cfg, _WORKDIR.value, stage=ToyStage(cfg, nan_steps=[int(s) for s in _NAN.value])))


if __name__ == "__main__":
    app.run(main)
