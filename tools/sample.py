"""Sample from a trained UMM run: text-to-image PNGs, segmentation masks, or VQA answers.

    python tools/sample.py --workdir=runs/demo/sgt --prompt="a red cube left of a blue ball" [--num_samples=4]
    python tools/sample.py --workdir=runs/demo/sgt --image=scene.png --task=segment
    python tools/sample.py --workdir=runs/demo/sgt --image=scene.png --task=vqa --question="How many objects are there?"

Params (EMA when the run keeps them) and the frozen VQ come from the workdir's latest Orbax
checkpoint (`--step` picks another), the config from that checkpoint's metadata (`--config` overrides
it), the tokenizer from the run's data directory (`--data_dir`). t2i PNGs go to
`<workdir>/samples/` (or `--out_dir`); a segmentation writes `<image stem>_mask.png` (palette RGB)
and `<image stem>_instances.png` (instance ids, 0 = background) next to the input image.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sgt_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "UMM run directory holding checkpoints/.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config file overriding the saved one.")
_TASK = flags.DEFINE_enum("task", "t2i", ["t2i", "segment", "semantic", "vqa"], "What to sample.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Text-to-image prompt (repeatable).")
_IMAGE = flags.DEFINE_multi_string("image", [], "Input image for segment / semantic / vqa (repeatable).")
_QUESTION = flags.DEFINE_string("question", "Describe the image.", "VQA question.")
_INSTRUCTION = flags.DEFINE_string("instruction", None, "Segmentation instruction (default: the first training one).")
_NUM = flags.DEFINE_integer("num_samples", 1, "Images per prompt.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "CFG scale (default: 5 for t2i, 1 = none for masks).")
_TEMP = flags.DEFINE_float("temperature", None, "0 = greedy (default: 1 for t2i, 0 for masks and vqa).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = latest).")
_OUT = flags.DEFINE_string("out_dir", None, "Where t2i PNGs go (default <workdir>/samples).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory holding the run's tokenizer.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "VQA answer length limit.")
_FORMAT = flags.DEFINE_enum("prompt_format", "sequence", ["sequence", "janus"],
                            "t2i / vqa prompts: the training sequence layout, or Janus's conversation format "
                            "(a converted Janus-Pro checkpoint; tokenizer with Janus's special tokens).")
_UNCOND = flags.DEFINE_enum("uncond", "pad", ["pad", "pad_prompt"],
                            "Janus-format CFG row: 'pad' = the reference's (all prompt tokens -> pad), "
                            "'pad_prompt' = only the user text -> pad.")
flags.mark_flags_as_required(["workdir"])


def sampling_config(task: str):
    """Flags -> SamplingConfig with per-task defaults (t2i: Janus CFG 5, T 1; masks/vqa: greedy)."""
    from sgt_jax.infer.sampler import SamplingConfig

    t2i = task == "t2i"
    guidance = _GUIDANCE.value if _GUIDANCE.value is not None else (5.0 if t2i else 1.0)
    temperature = _TEMP.value if _TEMP.value is not None else (1.0 if t2i else 0.0)
    return SamplingConfig(guidance_scale=guidance, temperature=temperature, top_k=_TOP_K.value, top_p=_TOP_P.value,
                          seed=_SEED.value, uncond=_UNCOND.value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


def _read_image(path: str, size: int):
    import numpy as np
    from PIL import Image

    image = Image.open(path).convert("RGB")
    original = image.size
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, np.uint8), original


def _check_prompts(texts) -> None:
    """An empty --prompt is rejected: this tool samples from a prompt, and an empty one would
    silently give unconditional samples (the classifier-free-guidance branch)."""
    for i, text in enumerate(texts):
        if not text.strip():
            logging.error("--prompt #%d is empty (%r): give the text to draw; empty prompts are rejected "
                          "rather than sampled unconditionally", i + 1, text)
            sys.exit(2)


def _check_prompt_lengths(builder, texts) -> None:
    """A prompt longer than the model's text room is rejected, not cut."""
    room = builder.layout.max_seq_len - (len(builder.t2i_prefix([])) + builder.layout.num_codes + 1)
    for i, text in enumerate(texts):
        n = len(builder.encode(text))
        if n > room:
            logging.error("--prompt #%d is %d tokens (%d characters) but this model takes at most %d prompt "
                          "tokens (data.max_seq_len=%d minus %d image codes and structural tokens); shorten it",
                          i + 1, n, len(text), room, builder.layout.max_seq_len,
                          builder.layout.max_seq_len - room)
            sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    import numpy as np
    from PIL import Image

    from sgt_jax import checks
    from sgt_jax.config import ConfigError
    from sgt_jax.data import datasets, sequences
    from sgt_jax.infer import prompts, sampler
    from sgt_jax.train import checkpoint as ckpt_lib
    from sgt_jax.train import restore

    try:  # a bad --workdir is named as such (not as the init_from.path it is read through)
        ckpt_lib.check_run_dir(_WORKDIR.value, _STEP.value)
        cfg = checks.prepare(_CONFIG.value) if _CONFIG.value is not None else None
    except (ckpt_lib.RunDirError, ConfigError) as e:
        logging.error("%s", e)
        sys.exit(2)
    if _TASK.value == "t2i":
        _check_prompts(_PROMPT.value)
    loaded = restore.load_umm(_WORKDIR.value, step=_STEP.value, cfg=cfg)
    cfg, task = loaded.cfg, _TASK.value
    tokenizer = datasets.load_dataset_tokenizer(cfg, _DATA_DIR.value)
    builder = sequences.SequenceBuilder.from_config(cfg, tokenizer)
    sampling = sampling_config(task)
    rng = jax.random.key(sampling.seed)
    logging.info("restored step %d from %s; sampling %s", loaded.step, _WORKDIR.value, sampling)
    janus_ids = None
    if _FORMAT.value == "janus":
        if task not in ("t2i", "vqa"):
            raise app.UsageError(f"--prompt_format=janus supports --task=t2i and --task=vqa, not {task!r}")
        from sgt_jax.convert.janus import special_ids

        janus_ids = special_ids(tokenizer)

    if task == "t2i":
        if not _PROMPT.value:
            raise app.UsageError("--task=t2i needs at least one --prompt")
        _check_prompt_lengths(builder, _PROMPT.value)
        out_dir = _OUT.value or os.path.join(_WORKDIR.value, "samples")
        os.makedirs(out_dir, exist_ok=True)
        texts = [p for p in _PROMPT.value for _ in range(_NUM.value)]
        if janus_ids is not None:
            cond, uncond = prompts.janus_generation(tokenizer, janus_ids, texts, uncond=sampling.uncond)
        else:
            cond, uncond = prompts.t2i_pair(builder, texts)
        images = sampler.generate_images(loaded.model, loaded.params, loaded.vq_model, loaded.vq_params, cond,
                                         sampling, rng, uncond if sampling.guidance_scale != 1.0 else None)
        for i, (text, image) in enumerate(zip(texts, images, strict=True)):
            path = os.path.join(out_dir, f"{_slug(text)}_s{sampling.seed}_{i % _NUM.value}.png")
            Image.fromarray(image).save(path)
            print(path)
        return

    if not _IMAGE.value:
        raise app.UsageError(f"--task={task} needs at least one --image")
    size = builder.layout.image_size
    inputs = [_read_image(p, size) for p in _IMAGE.value]
    batch = np.stack([im for im, _ in inputs])
    if task == "vqa":
        if janus_ids is not None:
            raw = [np.asarray(Image.open(p).convert("RGB"), np.uint8) for p in _IMAGE.value]
            vit = builder.layout
            prefix = prompts.janus_understanding(tokenizer, janus_ids, raw, _QUESTION.value, vit.num_vit_tokens,
                                                 image_size=vit.vit_image_size)
        else:
            prefix = prompts.vqa_prefixes(builder, batch, _QUESTION.value, answer_room=_MAX_NEW.value)
        ids = sampler.generate_text(loaded.model, loaded.params, prefix, _MAX_NEW.value, builder.ids.eos, sampling,
                                    rng)
        for path, answer in zip(_IMAGE.value, prompts.decode_text(tokenizer, ids, builder.ids.eos), strict=True):
            print(f"{path}: {answer}")
        return

    proxy = "segmentation" if task == "segment" else "semantic"
    maps, rgb = sampler.segment(loaded.model, loaded.params, loaded.vq_model, loaded.vq_params, builder, batch,
                                sampling, rng, instruction=_INSTRUCTION.value, proxy=proxy, return_rgb=True)
    suffix = "instances" if proxy == "segmentation" else "classes"
    for path, (_, original), label, mask in zip(_IMAGE.value, inputs, maps, rgb, strict=True):
        stem = os.path.splitext(path)[0]
        Image.fromarray(mask).resize(original, Image.Resampling.NEAREST).save(f"{stem}_mask.png")
        Image.fromarray(label).resize(original, Image.Resampling.NEAREST).save(f"{stem}_{suffix}.png")
        print(f"{stem}_mask.png")


if __name__ == "__main__":
    cli.run(main)
