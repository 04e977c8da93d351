"""Text tokenizers, always as `transformers` fast tokenizers.

Shapes World gets a small byte-level BPE trained with the `tokenizers` library on the world's own
text (byte level: any string round-trips exactly, no unknown words at demo time). Real runs load a
local Hugging Face tokenizer directory (e.g. Qwen2.5). Either way the image-span and
generation-span tokens exist as single special ids; they are added to a loaded tokenizer when
missing. Nothing is fetched from the network.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

from etils import epath

from sgt_jax.config import ConfigError
from sgt_jax.data import text

# Role -> token text used when a tokenizer lacks that role. Sequences are built explicitly by the
# task code (BOS, <img> ... </img>, ..., <boi> codes <eoi>), so no post-processor adds tokens.
SPECIAL_TOKENS = {
    "bos": "<bos>",
    "eos": "<eos>",
    "pad": "<pad>",
    "unk": "<unk>",
    "img": "<img>",
    "img_end": "</img>",
    "boi": "<boi>",
    "eoi": "<eoi>",
}
IMAGE_ROLES = ("img", "img_end", "boi", "eoi")
# A Janus / Janus-Pro tokenizer (converted checkpoints) already has image tokens: the understanding
# span and the generation span both open with <begin_of_image> and close with <end_of_image>, and its
# pad is <｜▁pad▁｜> (looked up by name, as the reference does; ids differ between 1B and 7B).
JANUS_ROLE_TOKENS = {"img": "<begin_of_image>", "img_end": "<end_of_image>", "boi": "<begin_of_image>",
                     "eoi": "<end_of_image>"}
JANUS_PAD = "<｜▁pad▁｜>"


def is_janus(tok) -> bool:
    """True for a tokenizer carrying Janus's own image tokens (they are used instead of ours)."""
    vocab = tok.get_vocab()
    return all(t in vocab for t in JANUS_ROLE_TOKENS.values())
DEFAULT_VOCAB_SIZE = 512  # ~1.3 tokens per word on world text; merges saturate near 900
DEFAULT_CORPUS_SCENES = 1000  # ~7k texts: the world's vocabulary is closed, this covers it


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE `tokenizers.Tokenizer` whose first ids are the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap(tokenizer_object):
    """Wrap a `tokenizers.Tokenizer` trained by `train_bpe` as a `PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens=[SPECIAL_TOKENS[r] for r in IMAGE_ROLES],
    )


def build_shapes_tokenizer(out_dir: str, cfg, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                           num_scenes: int = DEFAULT_CORPUS_SCENES, overwrite: bool = False):
    """Train the Shapes World tokenizer on `text.corpus(cfg, num_scenes)` and save it to `out_dir`.

    `cfg` is an experiment ConfigDict (uses cfg.data) or a `shapes_world.WorldConfig`; the corpus
    holds every instruction plus captions, prompts and MCQs of `num_scenes` train scenes. Idempotent:
    an existing `out_dir/tokenizer.json` is loaded instead of retrained unless `overwrite`. The
    directory is written atomically (temp dir + rename) so a crash never leaves half a tokenizer.
    Returns the loaded `PreTrainedTokenizerFast`.
    """
    if not overwrite and epath.Path(out_dir, "tokenizer.json").exists():
        return load_tokenizer(out_dir)
    tok = wrap(train_bpe(text.corpus(cfg, num_scenes), vocab_size))
    if "://" in out_dir:  # gs:// etc.: save locally, then copy the files up through epath
        with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
            tok.save_pretrained(tmp)
            dst = epath.Path(out_dir)
            dst.mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(tmp)):  # tokenizer.json last: its presence marks a complete save
                if name != "tokenizer.json":
                    epath.Path(tmp, name).copy(dst / name, overwrite=True)
            epath.Path(tmp, "tokenizer.json").copy(dst / "tokenizer.json", overwrite=True)
        return load_tokenizer(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    try:
        tok.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str):
    """Load a local tokenizer directory (ours or any HF one) and add missing image-span tokens.

    Only `<img> </img> <boi> <eoi>` are added when absent (appending ids past the original
    vocabulary: the model's embedding table must cover `len(tokenizer)`). BOS and pad are left as
    the tokenizer defines them: a pretrained LLM without a BOS (Qwen2) keeps using EOS for both,
    rather than gaining an untrained token (see `special_token_ids`).
    """
    if "://" in path:  # transformers reads local directories only: copy a gs:// one down first
        src = epath.Path(path)
        if not src.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (no hub downloads here)")
        local = tempfile.mkdtemp(prefix="tokenizer-")
        for f in src.iterdir():
            f.copy(epath.Path(local, f.name), overwrite=True)
        path = local
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (no hub downloads here)")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        # The generic fast class reads everything from tokenizer.json + tokenizer_config.json and,
        # unlike AutoTokenizer, does not import torch through the model-config machinery.
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:  # e.g. a sentencepiece-only directory: let transformers pick the class
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = tok.get_vocab()
    extra = [] if is_janus(tok) else [SPECIAL_TOKENS[r] for r in IMAGE_ROLES if SPECIAL_TOKENS[r] not in vocab]
    if extra:
        tok.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {path!r} has no eos token; sequences need one")
    return tok


def special_token_ids(tok) -> dict[str, int]:
    """Role -> id for bos, eos, pad, img, img_end, boi, eoi (+ unk when the tokenizer has one).

    Without a BOS (Qwen2) the EOS id serves as BOS, and without a pad token EOS serves as pad, the
    same rule as `sequences.SpecialIds.from_tokenizer`.
    """
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token")
    ids = {"bos": tok.bos_token_id if tok.bos_token_id is not None else eos, "eos": eos,
           "pad": tok.pad_token_id if tok.pad_token_id is not None else eos}
    if tok.unk_token_id is not None:
        ids["unk"] = tok.unk_token_id
    vocab = tok.get_vocab()
    if is_janus(tok):
        ids.update({role: vocab[t] for role, t in JANUS_ROLE_TOKENS.items()})
        ids["pad"] = vocab.get(JANUS_PAD, ids["pad"])
        return {k: int(v) for k, v in ids.items()}
    for role in IMAGE_ROLES:
        if SPECIAL_TOKENS[role] not in vocab:
            raise ValueError(f"tokenizer has no {SPECIAL_TOKENS[role]} token; load it with load_tokenizer()")
        ids[role] = vocab[SPECIAL_TOKENS[role]]
    return {k: int(v) for k, v in ids.items()}


def check_vocab_covers(tok, vocab_size: int, path: str) -> None:
    """A UMM's embedding table must cover the tokenizer, image-span tokens included."""
    if len(tok) > int(vocab_size):
        raise ConfigError(
            f"config field 'model.umm.llm.vocab_size' = {int(vocab_size)} is smaller than the tokenizer at {path!r} "
            f"({len(tok)} ids with the image-span tokens); allowed: >= {len(tok)} (or another data.tokenizer_dir)")
