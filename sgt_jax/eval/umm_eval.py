"""Evaluate a UMM run on Shapes World: the paper's benchmarks and analyses, exactly scored.

    python tools/evaluate.py --workdir=runs/sgt [--data_dir=DIR] [--override=mcq_items=100 ...]

writes `<workdir>/eval/metrics.json` and prints a table. Parts (`eval.umm.parts`):
  cvbench       CV-Bench analogue per split: count, relation, depth order, distance (+ mean)  [cvbench.py]
  geneval       GenEval analogue per split: six tags + overall, with the sampling settings [geneval_eval.py]
  segmentation  SGT inference image -> instruction -> mask codes -> instance map, mIoU  [geneval_eval.py]
  probes        linear probes per ViT / LLM layer for shape, colour, count             [probes.py]
  attention     attention shares per layer, understanding and generation               [attention.py]
Splits (`eval.umm.splits`): "test" and the held-out compositional split "heldout" for the first
three parts; probes fit on train scenes and score on test scenes; attention uses the test split.

All budgets come from `eval.umm` (see `EvalSettings`) so `make demo` can evaluate three runs in a
few minutes on 2 CPU cores. Scenes, items and prompts are fixed by `eval.umm.seed`, so runs are
compared on identical inputs. Jitted functions take the model as a static argument, so several runs
with the same architecture (base / SFT / SGT) share one compilation per function in one process.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from sgt_jax.data import sequences
from sgt_jax.data import shapes_world as sw
from sgt_jax.infer import sampler as sampler_lib

log = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("cvbench", "geneval", "segmentation", "probes", "attention")
METRICS_FILE = os.path.join("eval", "metrics.json")


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Evaluation budgets and sampling settings (mirrors the `eval.umm` config section)."""

    parts: tuple[str, ...] = PARTS
    splits: tuple[str, ...] = ("test", "heldout")
    seed: int = 0
    batch_size: int = 16
    mcq_items: int = 500
    mcq_method: str = "likelihood"
    mcq_circular: bool = True
    mcq_blind: bool = True
    geneval_prompts_per_tag: int = 50
    geneval_images_per_prompt: int = 4
    guidance_scale: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seg_images: int = 200
    seg_guidance_scale: float = 1.0
    seg_temperature: float = 1.0
    seg_top_k: int = 1
    probe_train_scenes: int = 256
    probe_test_scenes: int = 128
    probe_steps: int = 100
    probe_l2: float = 1e-3
    attn_items: int = 32
    attn_query_tokens: int = 4

    def __post_init__(self):
        bad = [p for p in self.parts if p not in PARTS]
        if bad:
            raise ValueError(f"config field 'eval.umm.parts' has unknown parts {bad}; allowed: {list(PARTS)}")
        bad = [s for s in self.splits if s not in sw.SPLITS]
        if bad:
            raise ValueError(f"config field 'eval.umm.splits' has unknown splits {bad}; allowed: {list(sw.SPLITS)}")

    @classmethod
    def from_config(cls, cfg, **overrides) -> "EvalSettings":
        """Read `cfg.eval.umm` (fields missing there keep the defaults above)."""
        section = cfg.eval.get("umm", None) if hasattr(cfg, "eval") else None
        kw = {}
        for f in dataclasses.fields(cls):
            if section is not None and f.name in section:
                value = section[f.name]
                kw[f.name] = tuple(value) if isinstance(value, (list, tuple)) else value
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **kw) -> "EvalSettings":
        return dataclasses.replace(self, **kw)

    def sampling(self) -> sampler_lib.SamplingConfig:
        """Text-to-image sampling for GenEval."""
        return sampler_lib.SamplingConfig(guidance_scale=float(self.guidance_scale),
                                          temperature=float(self.temperature), top_k=int(self.top_k),
                                          top_p=float(self.top_p), seed=int(self.seed))

    def seg_sampling(self) -> sampler_lib.SamplingConfig:
        """Mask sampling for segmentation inference (greedy by default: top_k = 1)."""
        return sampler_lib.SamplingConfig(guidance_scale=float(self.seg_guidance_scale),
                                          temperature=float(self.seg_temperature), top_k=int(self.seg_top_k),
                                          top_p=1.0, seed=int(self.seed))


# ---------------------------------------------------------------------------------------------
# a loaded run
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _encode_fn(vq_model):
    """Jitted uint8 images -> flat code ids with the frozen VQ (one compile per VQ architecture)."""
    from sgt_jax.models import vq as vq_lib

    def run(vq_params, images):
        codes = vq_lib.encode(vq_model, vq_params, images.astype(jnp.float32) / 127.5 - 1.0)
        return codes.reshape(codes.shape[0], -1).astype(jnp.int32)

    return jax.jit(run)


@dataclasses.dataclass
class UMMRun:
    """Everything the evaluators need from one run: model + params, frozen VQ, tokenizer, layout."""

    cfg: Any
    model: Any  # sgt_jax.models.umm.UMM
    params: Any  # UMM params
    vq_model: Any  # sgt_jax.models.vq.VQModel
    vq_params: Any
    tokenizer: Any
    builder: sequences.SequenceBuilder
    world: sw.WorldConfig
    step: int = 0
    workdir: str | None = None

    @classmethod
    def from_params(cls, cfg, params, vq_params, tokenizer, *, step: int = 0, workdir: str | None = None) -> "UMMRun":
        """A run from in-memory params (e.g. straight after training, or a test fixture)."""
        from sgt_jax.models import umm as umm_lib
        from sgt_jax.models import vq as vq_lib

        model = umm_lib.UMM(umm_lib.UMMConfig.from_config(cfg))
        vq_model = vq_lib.VQModel(vq_lib.spec_from_config(cfg), jnp.float32)
        builder = sequences.SequenceBuilder.from_config(cfg, tokenizer)
        return cls(cfg, model, params, vq_model, vq_params, tokenizer, builder, sw.WorldConfig.from_config(cfg),
                   step, workdir)

    @classmethod
    def from_workdir(cls, workdir: str, *, step: int = -1, cfg=None, data_dir: str | None = None,
                     tokenizer=None) -> "UMMRun":
        """Restore a UMM run (EMA params when it has them) with the config saved in its checkpoint.
        The tokenizer is the run's dataset tokenizer (`data_dir` overrides where the data lives)."""
        loaded = sampler_lib.load_model(workdir, step=step, cfg=cfg)
        if tokenizer is None:
            from sgt_jax.data import datasets

            tokenizer = datasets.load_dataset_tokenizer(loaded.cfg, data_dir)
        builder = sequences.SequenceBuilder.from_config(loaded.cfg, tokenizer)
        return cls(loaded.cfg, loaded.model, loaded.params, loaded.vq_model, loaded.vq_params, tokenizer, builder,
                   sw.WorldConfig.from_config(loaded.cfg), loaded.step, workdir)

    # -- array helpers ------------------------------------------------------------------------
    def vit_pixels(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B,H,W,3] -> float32 [B,S,S,3] in [-1, 1] for the understanding ViT."""
        s = self.builder.layout.vit_image_size
        return np.stack([sequences.vit_pixels(im, s) for im in np.asarray(images)])

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B,H,W,3] -> int32 [B, N] ground-truth codes from the frozen VQ."""
        return np.asarray(_encode_fn(self.vq_model)(self.vq_params, jnp.asarray(images)))

    def decode_codes(self, codes) -> np.ndarray:
        return sampler_lib.decode_codes(self.vq_model, self.vq_params, codes)

    def map_batches(self, fn: Callable, make: Callable[[list], Any], items: Sequence[Any], batch_size: int):
        """Apply `fn(params, make(chunk))` over fixed-size chunks of `items` and concatenate the
        outputs (a pytree whose leaves have the batch on axis 0). The last chunk is padded by
        repeating its last item, so every call has the same shapes (one compile)."""
        items = list(items)
        if not items:
            raise ValueError("map_batches: no items")
        bs = max(1, min(int(batch_size), len(items)))
        outs = []
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (bs - n)
            res = jax.device_get(fn(self.params, make(chunk)))
            outs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], res))
        return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)

    # -- prompts for the sampler (laid out by sgt_jax.infer.prompts) -------------------------
    def _gen_prefix_len(self) -> int:
        """One fixed prompt length for every generation batch (room for N codes + <eoi>), so each
        sampler loop compiles once."""
        return self.builder.layout.max_seq_len - self.builder.layout.num_codes - 1

    def t2i_prefixes(self, prompts: Sequence[str]) -> tuple[dict, dict]:
        """(cond, uncond) prefixes `<bos> prompt <boi>` / `<bos> pads <boi>`, prompts cut as in training."""
        from sgt_jax.infer import prompts as prompts_lib

        return prompts_lib.t2i_pair(self.builder, list(prompts), length=self._gen_prefix_len())

    def with_empty_spans(self, inputs: dict, codes: bool = False) -> dict:
        """Add absent image spans as empty ones (`*_start` = -1). The model splices nothing for them,
        so outputs are unchanged, but every batch has the same input structure (fewer compiles)."""
        out = dict(inputs)
        b = out["tokens"].shape[0]
        if "vit_images" not in out:
            s = self.builder.layout.vit_image_size
            out["vit_images"] = np.zeros((b, s, s, 3), np.float32)
            out["vit_start"] = np.full((b,), -1, np.int32)
        if codes and "codes" not in out:
            out["codes"] = np.zeros((b, self.builder.layout.num_codes), np.int32)
            out["gen_start"] = np.full((b,), -1, np.int32)
        return out

    def proxy_prefixes(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> tuple[dict, dict]:
        """(cond, uncond) SGT prefixes; the uncond row drops the instruction, never the image."""
        from sgt_jax.infer import prompts as prompts_lib

        return prompts_lib.proxy_pair(self.builder, list(images), list(instructions), length=self._gen_prefix_len())

    def sample_images(self, cond: dict, uncond: dict, sampling: sampler_lib.SamplingConfig, rng) -> np.ndarray:
        """Codes with CFG (cond/uncond rows paired in one batch) decoded to uint8 images."""
        codes = sampler_lib.generate_codes(self.model, self.params, cond, self.builder.layout.num_codes, sampling,
                                           rng, uncond)
        return self.decode_codes(codes)

    def generate_answers(self, prompts: Sequence[str], images: Sequence[np.ndarray], *, max_new_tokens: int = 6,
                         batch_size: int = 16) -> list[str]:
        """Greedy text answers to `<bos> <img> [V] </img> prompt` (cached decoding)."""
        from sgt_jax.infer import prompts as prompts_lib

        b = self.builder
        length = b.layout.max_seq_len - max_new_tokens
        greedy = sampler_lib.SamplingConfig(temperature=0.0)

        def make(chunk):
            return prompts_lib.vqa_prefixes(b, [img for _, img in chunk], [q for q, _ in chunk],
                                            answer_room=max_new_tokens, length=length)

        def fn(params, prefix):
            return sampler_lib.generate_text(self.model, params, prefix, max_new_tokens, b.ids.eos, greedy,
                                             jax.random.key(0))

        tokens = self.map_batches(fn, make, list(zip(prompts, images, strict=True)), batch_size)
        return prompts_lib.decode_text(self.tokenizer, tokens, b.ids.eos)


# ---------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------
def evaluate(run: UMMRun, settings: EvalSettings | None = None, *,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the configured parts on `run`; returns the metrics dict written to metrics.json."""
    from sgt_jax.eval import attention, cvbench, geneval_eval, probes

    s = settings or EvalSettings.from_config(run.cfg)
    say = progress or (lambda msg: log.info("%s", msg))
    world = run.world
    out: dict[str, Any] = {"step": int(run.step), "workdir": run.workdir, "settings": dataclasses.asdict(s),
                           "splits": {}, "timing_s": {}}
    t_all = time.time()

    def timed(name, fn, *args, **kw):
        t = time.time()
        say(f"eval {name} ...")
        res = fn(*args, **kw)
        out["timing_s"][name] = round(time.time() - t, 2)
        say(f"eval {name}: {out['timing_s'][name]:.1f}s")
        return res

    for split in s.splits:
        res: dict[str, Any] = {}
        if "cvbench" in s.parts:
            res["cvbench"] = timed(f"cvbench/{split}", cvbench.evaluate, run, world, split, per_task=s.mcq_items,
                                   method=s.mcq_method, seed=s.seed, batch_size=s.batch_size,
                                   circular=bool(s.mcq_circular), blind_control=bool(s.mcq_blind))
        if "geneval" in s.parts:
            res["geneval"] = timed(f"geneval/{split}", geneval_eval.evaluate_geneval, run, world, split,
                                   prompts_per_tag=s.geneval_prompts_per_tag,
                                   images_per_prompt=s.geneval_images_per_prompt, sampling=s.sampling(), seed=s.seed,
                                   batch_size=s.batch_size, sample_dir=_sample_dir(run))
        if "segmentation" in s.parts:
            res["segmentation"] = timed(f"segmentation/{split}", geneval_eval.evaluate_segmentation, run, world, split,
                                        num_images=s.seg_images, sampling=s.seg_sampling(), seed=s.seed,
                                        batch_size=s.batch_size, sample_dir=_sample_dir(run))
        out["splits"][split] = res
    if "probes" in s.parts:
        def run_probes():
            train = [sw.generate_scene(i, world, "train") for i in range(s.probe_train_scenes)]
            test = [sw.generate_scene(i, world, "test") for i in range(s.probe_test_scenes)]
            f_train = probes.extract_features(run, train, s.batch_size)
            f_test = probes.extract_features(run, test, s.batch_size)
            res = probes.probe_layers(f_train, probes.probe_labels(train), f_test, probes.probe_labels(test),
                                      l2=s.probe_l2, steps=s.probe_steps)
            res.update(train_scenes=len(train), test_scenes=len(test), train_split="train", test_split="test")
            return res
        out["probes"] = timed("probes", run_probes)
    if "attention" in s.parts:
        def run_attention():
            items = cvbench.mcq_items(world, "test", -(-s.attn_items // len(cvbench.CVBENCH_TASKS)), s.seed)
            rows = attention.generation_rows(world, s.attn_items, s.seed, "test")
            return {"understanding": attention.understanding_shares(
                        run, items, query_tokens=s.attn_query_tokens, batch_size=s.batch_size),
                    "generation": attention.generation_shares(run, rows, batch_size=s.batch_size)}
        out["attention"] = timed("attention", run_attention)
    out["timing_s"]["total"] = round(time.time() - t_all, 2)
    return out


def _sample_dir(run: UMMRun) -> str | None:
    return os.path.join(run.workdir, "eval") if run.workdir else None


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def write_metrics(workdir: str, metrics: Mapping[str, Any]) -> str:
    """Write `<workdir>/eval/metrics.json` atomically (NaN -> null) and return its path."""
    path = epath.Path(workdir, METRICS_FILE)  # epath: gs:// as well as local
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = epath.Path(os.fspath(path) + ".tmp")
    tmp.write_text(json.dumps(_jsonable(metrics), indent=1, sort_keys=False))
    tmp.replace(path)
    return os.fspath(path)


def read_metrics(workdir_or_file: str) -> dict:
    path = workdir_or_file if workdir_or_file.endswith(".json") else os.path.join(workdir_or_file, METRICS_FILE)
    return json.loads(epath.Path(path).read_text())


def evaluate_workdir(workdir: str, settings: EvalSettings | None = None, *, step: int = -1, cfg=None,
                     data_dir: str | None = None, overrides: Mapping[str, Any] | None = None, write: bool = True,
                     show: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the run in `workdir`, evaluate it, write eval/metrics.json and print the table.

    Settings: `settings` if given, else the run's `eval.umm` config section; `overrides` (field ->
    value, e.g. {"mcq_items": 16}) replace single fields either way."""
    run = UMMRun.from_workdir(workdir, step=step, cfg=cfg, data_dir=data_dir)
    s = settings or EvalSettings.from_config(run.cfg)
    if overrides:
        s = s.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    metrics = evaluate(run, s, progress=progress)
    if write:
        metrics["metrics_file"] = write_metrics(workdir, metrics)
    if show:
        print(format_table(metrics))
    return metrics


# ---------------------------------------------------------------------------------------------
# the printed table
# ---------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * float(x):5.1f}"


def format_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text summary: one row per split, then probes and attention (percentages)."""
    from sgt_jax.eval.cvbench import CVBENCH_TASKS
    from sgt_jax.eval.geneval import TAGS

    short = {"count": "count", "relation": "rel", "depth_order": "depth", "distance": "dist",
             "single_object": "single", "two_object": "two", "counting": "counting", "colors": "colors",
             "position": "pos", "color_attr": "c_attr"}
    cols = [("cvbench", t) for t in CVBENCH_TASKS] + [("cvbench", "mean")] + \
        [("geneval", t) for t in TAGS] + [("geneval", "overall"), ("segmentation", "miou")]
    names = [short.get(k, k) if part != "segmentation" else "seg_mIoU" for part, k in cols]
    names = [("cv_" + n if part == "cvbench" and n == "mean" else n) for (part, _), n in zip(cols, names, strict=True)]
    head = f"{'split':8s} " + " ".join(f"{n:>8s}" for n in names)
    lines = [f"UMM evaluation: {metrics.get('workdir') or '<in memory>'} (step {metrics.get('step')})", head]
    for split, res in metrics.get("splits", {}).items():
        vals = [_pct((res.get(part) or {}).get(k)) for part, k in cols]
        lines.append(f"{split:8s} " + " ".join(f"{v:>8s}" for v in vals))
    for split, res in metrics.get("splits", {}).items():
        g = res.get("geneval")
        if g:
            lines.append(f"geneval/{split} sampling: {g.get('sampling')}, {g.get('num_images')} images")
            break
    p = metrics.get("probes")
    if p:
        for t in ("shape", "color", "count"):
            if t in p:
                accs = p[t]["test_acc"]
                best = int(np.argmax(accs))
                lines.append(f"probe {t:6s} test acc per layer: " + " ".join(_pct(a).strip() for a in accs)
                             + f"  (best {p['layers'][best]}, chance {_pct(p[t]['chance']).strip()})")
        lines.append("probe layers: " + " ".join(p["layers"]))
    a = metrics.get("attention")
    if a:
        u = a["understanding"]
        lines.append("attention last question tokens -> image, per layer: "
                     + " ".join(_pct(v).strip() for v in u["image"]))
        g = a["generation"]
        for k in ("object", "color", "position", "count", "other"):
            lines.append(f"attention codes -> {k:8s} words (share of prompt), per layer: "
                         + " ".join(_pct(v).strip() for v in g[k]))
    if metrics.get("timing_s"):
        lines.append("time (s): " + ", ".join(f"{k} {v}" for k, v in metrics["timing_s"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line (the UMM branch of tools/evaluate.py)
# ---------------------------------------------------------------------------------------------
def is_umm_workdir(workdir: str, step: int = -1) -> bool:
    """Whether a workdir's checkpoint was written by the "umm" stage."""
    from sgt_jax.train import checkpoint as ckpt_lib

    try:
        meta = ckpt_lib.read_metadata(workdir, step)
    except FileNotFoundError:
        return False
    if meta.get("stage"):
        return meta["stage"] == "umm"
    saved = meta.get("config")
    saved = json.loads(saved) if isinstance(saved, str) else (saved or {})
    return saved.get("stage") == "umm"


_ALIASES = {"geneval_per_tag": "geneval_prompts_per_tag"}  # short name used by tools/demo.py


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """["mcq_items=16", "parts=('cvbench',)"] -> {field: value} for `EvalSettings` (literal values)."""
    import ast

    names = {f.name for f in dataclasses.fields(EvalSettings)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("eval.umm.")
        key = _ALIASES.get(key, key)
        if not sep or key not in names:
            raise ValueError(f"evaluation override {item!r}: expected FIELD=VALUE with FIELD in {sorted(names)}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def run_cli(workdir: str, *, step: int = -1, cfg=None, data_dir: str | None = None, overrides: Sequence[str] = ()
            ) -> dict[str, Any]:
    """Entry used by tools/evaluate.py for UMM workdirs: settings from `eval.umm` of `cfg` (or of the
    run's saved config when cfg is None) with `FIELD=VALUE` overrides; prints progress and the
    table, writes eval/metrics.json."""
    settings = EvalSettings.from_config(cfg) if cfg is not None else None
    return evaluate_workdir(workdir, settings, step=step, cfg=cfg, data_dir=data_dir,
                            overrides=parse_overrides(overrides), progress=lambda m: print(m, flush=True))


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The table's numbers as a flat dict ("test/cvbench/mean": 0.61, ...) plus the metrics file."""
    out: dict[str, Any] = {}
    for split, res in (metrics.get("splits") or {}).items():
        for part, key in (("cvbench", "mean"), ("geneval", "overall"), ("segmentation", "miou")):
            if part in res:
                out[f"{split}/{part}/{key}"] = res[part].get(key)
    if metrics.get("metrics_file"):
        out["metrics_file"] = metrics["metrics_file"]
    return _jsonable(out)
