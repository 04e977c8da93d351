"""Export a UMM run's parameters (EMA when it has them) as a small params-only checkpoint.

    python tools/export_params.py --workdir=runs/base --out=assets/base_shapes32 [--step=-1] [--dtype=float16]

Why: a base that learns takes longer to train than the 30-minute demo allows on 2 CPU cores, so the
repo ships one (issue 12) and the demo post-trains from it. The export is a checkpoint directory in
the layout every tool reads (`OUT/checkpoints/<step>/state` + `metadata`): `init_from.path=OUT`
starts a post-training run from it, `tools/evaluate.py --workdir=OUT` scores it, and
`tools/sample.py --workdir=OUT` samples from it. It holds only `params` ({"umm": ..., "vq": ...}),
no optimizer state or data iterator, stored in `--dtype` (float16 halves float32; params are read
back as float32). The metadata keeps the run's config and says where the export came from.
"""
from __future__ import annotations

import os
import sys
import time

import provenance  # tools/provenance.py
from absl import app, flags

from sgt_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "UMM run to export (its checkpoints/ directory is read).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = latest).")
_OUT = flags.DEFINE_string("out", None, "Directory to write (must not hold a checkpoint yet).")
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "Stored parameter dtype.")
flags.mark_flags_as_required(["workdir", "out"])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(workdir: str, out: str, *, step: int = -1, dtype: str = "float16") -> dict:
    """Write the params-only checkpoint; returns its metadata."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from etils import epath

    from sgt_jax.train import checkpoint as ckpt_lib
    from sgt_jax.train import restore

    root = epath.Path(out).absolute() / "checkpoints"
    if root.exists() and any(d.name.isdigit() for d in root.iterdir()):
        raise FileExistsError(f"--out={out!r} already holds a checkpoint; export into a new directory")
    loaded = restore.load_umm(workdir, step=step)
    source = ckpt_lib.read_metadata(workdir, step)
    cast = jnp.dtype(dtype)
    tree = {"params": jax.tree.map(lambda a: jnp.asarray(a, cast) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                   {"umm": loaded.params, "vq": loaded.vq_params})}
    meta = {"step": loaded.step, "time": time.time(), "stage": "umm", "config": source["config"],
            "exported": {"from": os.path.abspath(workdir), "step": loaded.step, "dtype": dtype,
                         "source_params": ckpt_lib.params_source(workdir, step), "commit": provenance.git_commit(short=True),
                         "num_params": int(sum(x.size for x in jax.tree.leaves(tree)))}}
    mgr = ocp.CheckpointManager(root, item_handlers={ckpt_lib.STATE: ocp.StandardCheckpointHandler(),
                                                     ckpt_lib.META: ocp.JsonCheckpointHandler()})
    mgr.save(loaded.step, args=ocp.args.Composite(**{ckpt_lib.STATE: ocp.args.StandardSave(tree),
                                                     ckpt_lib.META: ocp.args.JsonSave(meta)}))
    mgr.wait_until_finished()
    mgr.close()
    return meta


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not os.path.isdir(_WORKDIR.value):
        print(f"export_params: --workdir={_WORKDIR.value!r}: directory does not exist", file=sys.stderr)
        sys.exit(2)
    meta = export(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value)
    e = meta["exported"]
    print(f"exported step {e['step']} of {e['from']} ({e['num_params']:,} params, {e['dtype']}, "
          f"from its {e['source_params']}) to {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
