"""Tokenizers: the Shapes World BPE round-trips text, special tokens are single ids, HF dirs load offline."""
import itertools
import os

import pytest

from sgt_jax.config import default_config
from sgt_jax.data import tokenizer as toklib

SPECIAL_TEXTS = ["<bos>", "<eos>", "<pad>", "<img>", "</img>", "<boi>", "<eoi>"]


def _cfg():
    cfg = default_config()
    cfg.data.image_size = 32
    return cfg


@pytest.fixture(scope="module")
def shapes_tok(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok") / "shapes_world")
    return out, toklib.build_shapes_tokenizer(out, _cfg(), vocab_size=512, num_scenes=300)


def test_round_trip_on_world_text_and_arbitrary_text(shapes_tok):
    from sgt_jax.data import shapes_world, text

    _, tok = shapes_tok
    world = shapes_world.WorldConfig(image_size=32)
    # Texts of scenes the tokenizer never saw (the corpus is a prefix of this stream).
    samples = list(itertools.islice(text.corpus(world, 400), 2500, 2550))
    samples += ["A 3-D ünïcödé string, with tabs\tand  double  spaces!", "   leading spaces", ""]
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
    # The world's words are common enough to be compressed well (not byte by byte).
    words = sum(len(s.split()) for s in samples[:50])
    ids = sum(len(tok.encode(s, add_special_tokens=False)) for s in samples[:50])
    assert ids < 2.0 * words, (ids, words)


def test_special_tokens_are_single_distinct_ids(shapes_tok):
    _, tok = shapes_tok
    ids = toklib.special_token_ids(tok)
    assert set(ids) == {"bos", "eos", "pad", "unk", "img", "img_end", "boi", "eoi"}
    assert len(set(ids.values())) == len(ids)
    for role, text in toklib.SPECIAL_TOKENS.items():
        assert tok.encode(text, add_special_tokens=False) == [ids[role]]
    s = "<bos><img></img>how many circles?<boi><eoi><eos>"
    got = tok.encode(s, add_special_tokens=False)
    assert got[:3] == [ids["bos"], ids["img"], ids["img_end"]] and got[-3:] == [ids["boi"], ids["eoi"], ids["eos"]]
    assert tok.decode(got) == s
    assert tok.decode(got, skip_special_tokens=True) == "how many circles?"
    # No implicit BOS/EOS: the sequence builder places them explicitly.
    assert tok.encode("red", add_special_tokens=True) == tok.encode("red", add_special_tokens=False)


def test_saved_dir_reloads_identically_and_build_is_idempotent(shapes_tok):
    out, tok = shapes_tok
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    mtime = os.path.getmtime(os.path.join(out, "tokenizer.json"))
    again = toklib.build_shapes_tokenizer(out, _cfg(), vocab_size=512, num_scenes=300)
    assert os.path.getmtime(os.path.join(out, "tokenizer.json")) == mtime
    from transformers import PreTrainedTokenizerFast

    direct = PreTrainedTokenizerFast.from_pretrained(out)
    s = "the blue star is left of the red circle"
    assert again.encode(s) == tok.encode(s) == direct.encode(s)
    assert toklib.special_token_ids(again) == toklib.special_token_ids(tok) == toklib.special_token_ids(direct)
    assert len(tok) <= 512


def _qwen_like_dir(path):
    """A local HF tokenizer dir shaped like Qwen2.5's: byte-level BPE, no BOS, chat specials only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw.train_from_iterator(["hello world", "a small test corpus", "the quick brown fox"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  extra_special_tokens=["<|im_start|>"])
    tok.save_pretrained(path)
    return tok


def test_foreign_tokenizer_gets_image_tokens_added(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = _qwen_like_dir(str(tmp_path / "qwen"))
    base = len(original)
    tok = toklib.load_tokenizer(str(tmp_path / "qwen"))
    ids = toklib.special_token_ids(tok)
    assert ids["bos"] == ids["eos"] == original.convert_tokens_to_ids("<|im_end|>")  # no BOS: EOS stands in
    assert ids["pad"] == original.convert_tokens_to_ids("<|endoftext|>")
    assert sorted(ids[r] for r in toklib.IMAGE_ROLES) == list(range(base, base + 4))
    assert len(tok) == base + 4
    for role in toklib.IMAGE_ROLES:
        assert tok.encode(toklib.SPECIAL_TOKENS[role], add_special_tokens=False) == [ids[role]]
    assert tok.encode("hello world") == original.encode("hello world")  # existing ids untouched
    assert tok.convert_tokens_to_ids("<|im_start|>") == original.convert_tokens_to_ids("<|im_start|>")
    assert "<|im_start|>" in tok.all_special_tokens  # existing extra specials kept


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        toklib.load_tokenizer(str(tmp_path / "nope"))
