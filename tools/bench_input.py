"""Input-pipeline speed: examples/s of the real grain pipeline next to what the train step consumes.

  python tools/bench_input.py --config=configs/umm_1b.py:data=real,sam=DIR,llava=DIR,tokenizer=TOK \
      --hosts=16 --num_workers=8 --batches=50 --warmup=5 (--step_time_s=1.9 | --measure_step)

The pipeline is the training one (`pipeline.make_iterator` over `datasets.open_source`, the task
transforms of `sequences`: JPEG decode, ViT resize, target rendering and the VQ-size resize,
tokenisation, the 2 : 1 mixture, batching) for one host's slice: rows per host =
train.batch_size / --hosts. Warm-up batches (worker start, first reads) are timed apart. The train
step consumes rows_per_host / step_time examples/s per host, from --step_time_s or measured here
with --measure_step (the real jitted step, as tools/bench.py builds it; needs the accelerator).
Headroom = pipeline examples/s / consumption (the goal is >= 5x). Prints a markdown table.

Without the real data: `--synthetic=N` writes N SAM-SGT-layout pairs (smooth 640 x 480 JPEG photos,
masks of 12 flat rectangles at half resolution) and N LLaVA parquet rows (3 turns) under --out_dir,
points the config's sources at them and builds them first (building is not timed).
"""
from __future__ import annotations

import json
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (path[:arg]).", lock_config=False)
_HOSTS = flags.DEFINE_integer("hosts", 0, "Hosts sharing train.batch_size (0 = jax.process_count()).")
_WORKERS = flags.DEFINE_integer("num_workers", -1, "grain worker processes (-1 = data.num_workers).")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed-for-throughput warm-up batches.")
_STEP_TIME = flags.DEFINE_float("step_time_s", 0.0, "Train step time to compare with (seconds).")
_MEASURE = flags.DEFINE_bool("measure_step", False, "Measure the train step time (tools/bench.py's runner).")
_OUT = flags.DEFINE_string("out", "", "Also write the numbers as JSON here.")
_SYNTHETIC = flags.DEFINE_integer("synthetic", 0, "Write N synthetic SAM-SGT + LLaVA items and read those.")
_SYNTH_DIR = flags.DEFINE_string("synthetic_dir", "/tmp/sgt_bench_input", "Where --synthetic writes its copies.")
flags.mark_flags_as_required(["config"])


def write_synthetic(root: str, n: int) -> tuple[str, str]:
    """N SAM-SGT pairs (list-file layout) and N LLaVA parquet rows under root; returns (sam, llava)."""
    import os

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from sgt_jax.data import real_images

    sam, llava = os.path.join(root, "sam"), os.path.join(root, "llava")
    for d in ("sam_selection", "sam_mask", "file_names"):
        os.makedirs(os.path.join(sam, d), exist_ok=True)
    os.makedirs(os.path.join(llava, "synthetic"), exist_ok=True)
    rng = np.random.default_rng(0)

    def photo():  # smooth, so its JPEG is photo-sized rather than noise-sized
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC))

    lines, rows = [], []
    for i in range(n):
        with open(os.path.join(sam, "sam_selection", f"{i:06d}.jpg"), "wb") as f:
            f.write(real_images.encode_jpeg(photo()))
        mask = np.zeros((240, 320, 3), np.uint8)
        for _ in range(12):
            y, x = rng.integers(0, 200), rng.integers(0, 280)
            mask[y:y + rng.integers(10, 60), x:x + rng.integers(10, 60)] = rng.integers(30, 255, 3)
        Image.fromarray(mask).save(os.path.join(sam, "sam_mask", f"{i:06d}.png"))
        lines.append(f"sam_selection/{i:06d}.jpg")
        conv = []
        for t in range(3):
            conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + f"What is in region {t}?"},
                     {"from": "gpt", "value": "A synthetic rectangle of some colour, seen from above. " * 3}]
        rows.append({"id": str(i), "image": {"bytes": real_images.encode_jpeg(photo()), "path": f"{i}.jpg"},
                     "conversations": conv, "data_source": "synthetic"})
    with open(os.path.join(sam, "file_names", "synthetic.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(llava, "synthetic", "train-00000-of-00001.parquet"))
    return sam, llava


def measure_step_time(cfg) -> float:
    import bench_lib as bench  # tools/bench_lib.py

    runner = bench.make_runner(cfg, name="train_step")
    bench.time_interleaved([runner], warmup=2, rounds=5)
    return float(bench.summarize([runner])[0].step_s_median)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if _BATCHES.value <= 0 or _WARMUP.value < 0 or _STEP_TIME.value < 0:
        logging.error("--batches=%d / --warmup=%d / --step_time_s=%s: allowed batches >= 1, warmup >= 0, "
                      "step_time_s >= 0", _BATCHES.value, _WARMUP.value, _STEP_TIME.value)
        return 2
    import jax

    from sgt_jax.checks import prepare as validate  # finalize + every rule
    from sgt_jax.data import datasets, pipeline, sequences

    if _SYNTHETIC.value > 0:
        import os

        sam, llava = write_synthetic(_SYNTH_DIR.value, _SYNTHETIC.value)
        seg = next((t for t in cfg.data.mixture.keys() if t.startswith("proxy_")), None)
        cfg.data.sources = {"understanding": "llava_onevision", **({seg: "sam_sgt"} if seg else {})}
        cfg.data.manual_dirs = {"sam_sgt": sam, "llava_onevision": llava}
        cfg.data.data_dir = os.path.join(_SYNTH_DIR.value, "data_cache")
    validate(cfg)
    hosts = _HOSTS.value or jax.process_count()
    if cfg.train.batch_size % hosts:
        logging.error("--hosts=%d does not divide train.batch_size = %d", hosts, cfg.train.batch_size)
        return 2
    rows = cfg.train.batch_size // hosts
    workers = cfg.data.num_workers if _WORKERS.value < 0 else _WORKERS.value
    datasets.ensure_dataset(cfg)
    transforms = sequences.make_task_transforms(cfg, datasets.load_dataset_tokenizer(cfg))
    it = pipeline.make_iterator(cfg, "train", transforms, process_index=0, process_count=hosts, batch_size=rows,
                                num_workers=workers)
    t0 = time.perf_counter()
    for _ in range(_WARMUP.value):
        next(it)
    t1 = time.perf_counter()
    tasks: dict[int, int] = {}
    for _ in range(_BATCHES.value):
        batch = next(it)
        for t in batch["task"].tolist():
            tasks[t] = tasks.get(t, 0) + 1
    t2 = time.perf_counter()
    ex_s = _BATCHES.value * rows / (t2 - t1)
    step_s = measure_step_time(cfg) if _MEASURE.value else _STEP_TIME.value
    need = rows / step_s if step_s > 0 else float("nan")
    from sgt_jax.config import TASKS

    res = {"config_rows_per_host": rows, "hosts": hosts, "num_workers": workers, "timed_batches": _BATCHES.value,
           "warmup_batches": _WARMUP.value, "warmup_s": round(t1 - t0, 3), "timed_s": round(t2 - t1, 3),
           "examples_per_s": round(ex_s, 2), "step_time_s": step_s or None,
           "step_consumes_examples_per_s": round(need, 2) if step_s > 0 else None,
           "headroom": round(ex_s / need, 2) if step_s > 0 else None,
           "task_counts": {TASKS[k]: v for k, v in sorted(tasks.items())},
           "vit_size": int(batch["vit_image"].shape[1]), "vq_size": int(batch["target_image"].shape[1]),
           "skipped": pipeline.skip_counts(it)["total"]}
    print("| rows/host | workers | ViT px | VQ px | timed batches | pipeline ex/s | step s | step ex/s | headroom |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "n/a" if v is None else str(v)  # noqa: E731
    print(f"| {rows} | {workers} | {res['vit_size']} | {res['vq_size']} | {_BATCHES.value} | {res['examples_per_s']} | "
          f"{fmt(res['step_time_s'])} | {fmt(res['step_consumes_examples_per_s'])} | {fmt(res['headroom'])} |")
    print(f"tasks in the timed batches: {res['task_counts']}; skipped records: {res['skipped']}; "
          f"warm-up {res['warmup_s']} s for {_WARMUP.value} batches")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
