"""Train the stage a config names; re-running the same command resumes from the latest checkpoint.

    python tools/train.py --config=configs/vq_shapes.py:smoke --workdir=runs/vq [--config.optim.lr=3e-4]

Multi-process: add --config.train.distributed=True (Cloud TPU: see launch/tpu_pod.sh; one machine:
launch/local_multiprocess.py).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from sgt_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard logs, eval outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sgt_jax.train import loop  # after flag parsing so --help stays fast
    sys.exit(loop.run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    cli.run(main)
