"""Measure what verified checkpoints cost: save and restore of a real train state with and without
the per-array checksums (sgt_jax.train.checkpoint), interleaved so machine noise hits both alike.

    python tools/bench_checkpoint.py                      # base_shapes and a 2-layer umm_1b slice
    python tools/bench_checkpoint.py --case="configs/vq_shapes.py:smoke" --rounds=1   # proves it runs
    python tools/bench_checkpoint.py --devices=8 --rounds=5 --dir=/fast/disk/tmp

A case is `configs/x.py[:arg][|field=value,field=value]` (overrides after `|`). Each round saves the
same state once per mode (async save + wait, as the loop's save and a final wait) and restores it
once per mode (restore + verification), after one untimed warm-up round that compiles the
checksum. The table gives the median seconds over the rounds and the ratio verified / plain.
Nothing here asserts speed; run it on an idle machine.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags

_DEFAULT_CASES = ["configs/base_shapes.py",
                  "configs/umm_1b.py|model.umm.llm.depth=2,model.umm.vit.depth=2,mesh.shape=(1,-1,1)"]
_CASES = flags.DEFINE_multi_string("case", _DEFAULT_CASES, "config[:arg][|field=value,...]; repeatable.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per case (median reported).")
_DEVICES = flags.DEFINE_integer("devices", 0, "Simulate this many CPU devices (0 = the real devices).")
_DIR = flags.DEFINE_string("dir", "", "Where checkpoints are written (default: a temp dir, removed after).")


def _simulate_devices(n: int) -> None:
    if n > 0:
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
                if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _build_state(case: str):
    """(name, cfg, setup) for a case, the state initialised and sharded as the loop does
    (`build_trainer` through tools/bench_lib.py)."""
    import bench_lib  # tools/bench_lib.py: imports jax, so after the device flags

    from sgt_jax.config import load_config, parse_assignments

    spec, _, overrides = case.partition("|")
    trainer = bench_lib.build(bench_lib.apply_overrides(load_config(spec), parse_assignments(overrides).items()))
    return case, trainer.cfg, trainer.setup


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(case: str, rounds: int, root: str) -> dict:
    import jax

    from sgt_jax.train import checkpoint as ckpt_lib

    name, cfg, setup = _build_state(case)
    leaves = jax.tree.leaves(setup.state.to_tree())
    nbytes = sum(int(x.size) * x.dtype.itemsize for x in leaves)
    times = {k: [] for k in ("save_plain", "save_verified", "restore_plain", "restore_verified")}
    step = 0
    for r in range(rounds + 1):  # round 0 warms up (compiles the checksum, opens tensorstore)
        for verify in (False, True) if r % 2 == 0 else (True, False):
            mode = "verified" if verify else "plain"
            d = os.path.join(root, f"{abs(hash(case))}-{mode}")
            ck = ckpt_lib.Checkpointer(d, keep=1, async_save=True, verify=verify)
            step += 1

            def save(ck=ck, step=step):
                ck.save(step, setup.state, metadata={})
                ck.wait()
            t_save = _time(save)
            t_restore = _time(lambda ck=ck, step=step: jax.block_until_ready(
                ck.restore(setup.abstract, step=step)[0].to_tree()))
            ck.close()
            if r:
                times[f"save_{mode}"].append(t_save)
                times[f"restore_{mode}"].append(t_restore)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": name, "arrays": len(leaves), "state_bytes": nbytes, "rounds": rounds, **med,
            "save_ratio": med["save_verified"] / med["save_plain"],
            "restore_ratio": med["restore_verified"] / med["restore_plain"]}


def table(rows: list[dict]) -> str:
    head = ["case", "arrays", "state MiB", "save plain s", "save verified s", "save ratio", "restore plain s",
            "restore verified s", "restore ratio", "rounds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["case"], str(r["arrays"]), f"{r['state_bytes'] / 2**20:.1f}", f"{r['save_plain']:.3f}",
            f"{r['save_verified']:.3f}", f"{r['save_ratio']:.2f}", f"{r['restore_plain']:.3f}",
            f"{r['restore_verified']:.3f}", f"{r['restore_ratio']:.2f}", str(r["rounds"])]) + " |")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _ROUNDS.value < 1:
        print(f"--rounds={_ROUNDS.value}: must be >= 1", file=sys.stderr)
        return 2
    _simulate_devices(_DEVICES.value)
    import jax

    root = _DIR.value or tempfile.mkdtemp(prefix="sgt_bench_ckpt_")
    try:
        rows = [measure(case, _ROUNDS.value, os.path.abspath(root)) for case in _CASES.value]
    finally:
        if not _DIR.value:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); median of {_ROUNDS.value} round(s)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
