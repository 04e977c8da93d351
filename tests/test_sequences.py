"""Task sequences: span positions, loss masks per task, CFG dropout rate, determinism."""
import numpy as np
import pytest

from sgt_jax.config import TASKS
from sgt_jax.data import sequences as seq

V, N, L = 4, 9, 48  # ViT slots, code slots, row length (tiny on purpose)


@pytest.fixture(scope="module")
def tokenizer():
    """A real Hugging Face fast tokenizer (word level) with the project's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("a red green blue cube ball left of right the how many objects are there answer describe image "
             "segment instances colour each one a b c d options two three").split()
    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<img>", "</img>", "<boi>", "<eoi>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(words)) + ["(", ")", ".", "?", ":"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", additional_special_tokens=specials[4:])


@pytest.fixture(scope="module")
def builder(tokenizer):
    layout = seq.Layout(max_seq_len=L, num_vit_tokens=V, vit_image_size=16, num_codes=N, image_size=24,
                        text_weight=1.5, gen_weight=1.0, cond_dropout=0.1)
    return seq.SequenceBuilder(layout, seq.SpecialIds.from_tokenizer(tokenizer),
                               lambda s: tokenizer.encode(s, add_special_tokens=False))


def _img(seed=0, size=24):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _check_common(ex, ids):
    assert ex["tokens"].shape == (L,) and ex["tokens"].dtype == np.int32
    n = int(ex["attn_mask"].sum())
    assert (ex["attn_mask"][:n] == 1).all() and (ex["attn_mask"][n:] == 0).all()  # right padding only
    # No loss is ever placed on a position whose next token is padding.
    assert (ex["text_loss_weight"][n - 1:] == 0).all() and (ex["gen_loss_mask"][n - 1:] == 0).all()
    assert ex["tokens"][0] == ids.bos
    return n


def test_special_ids_from_hf_tokenizer(tokenizer):
    ids = seq.SpecialIds.from_tokenizer(tokenizer)
    assert len({ids.bos, ids.eos, ids.pad, ids.img, ids.img_end, ids.boi, ids.eoi}) == 7
    assert tokenizer.convert_ids_to_tokens(ids.boi) == "<boi>"


def test_understanding_loss_only_on_answer_and_eos(builder, tokenizer):
    ids = builder.ids
    ex = builder.understanding(_img(), "how many objects are there ?", "two objects")
    n = _check_common(ex, ids)
    t = ex["tokens"]
    assert int(ex["vit_start"]) == 2 and int(ex["gen_start"]) == -1
    assert t[1] == ids.img and t[2 + V] == ids.img_end  # span is exactly V slots
    answer = tokenizer.encode("two objects", add_special_tokens=False)
    a0 = n - 1 - len(answer)  # first answer position
    assert list(t[a0:n - 1]) == answer and t[n - 1] == ids.eos
    w = ex["text_loss_weight"]
    # Weight on position p scores token p+1: exactly the answer tokens and <eos> are targets.
    expected = np.zeros(L, np.float32)
    expected[a0 - 1:n - 1] = 1.5
    np.testing.assert_array_equal(w, expected)
    assert ex["gen_loss_mask"].sum() == 0
    assert int(ex["task"]) == TASKS.index("understanding")
    assert ex["vit_image"].dtype == np.float32 and ex["vit_image"].shape == (16, 16, 3)
    assert -1.0 <= ex["vit_image"].min() and ex["vit_image"].max() <= 1.0


def test_t2i_loss_only_on_codes(builder, tokenizer):
    ids = builder.ids
    target = _img(1)
    ex = builder.text_to_image("a red cube left of a blue ball", target, drop=False)
    n = _check_common(ex, ids)
    t, g = ex["tokens"], int(ex["gen_start"])
    prompt = tokenizer.encode("a red cube left of a blue ball", add_special_tokens=False)
    assert g == 1 + len(prompt) + 1 and t[g - 1] == ids.boi and t[g + N] == ids.eoi and n == g + N + 1
    assert list(t[1:g - 1]) == prompt
    expected = np.zeros(L, np.float32)
    expected[g - 1:g + N - 1] = 1.0  # <boi> .. second-to-last code predict the N codes
    np.testing.assert_array_equal(ex["gen_loss_mask"], expected)
    assert ex["text_loss_weight"].sum() == 0
    assert int(ex["vit_start"]) == -1
    np.testing.assert_array_equal(ex["target_image"], target)
    assert int(ex["task"]) == TASKS.index("t2i")


def test_t2i_dropped_prompt_is_pads_of_same_length(builder):
    ids = builder.ids
    cond = builder.text_to_image("a red cube", _img(), drop=False)
    unc = builder.text_to_image("a red cube", _img(), drop=True)
    g = int(cond["gen_start"])
    assert int(unc["gen_start"]) == g
    assert unc["tokens"][0] == ids.bos and unc["tokens"][g - 1] == ids.boi
    assert (unc["tokens"][1:g - 1] == ids.pad).all() and (cond["tokens"][1:g - 1] != ids.pad).all()
    assert unc["attn_mask"][:g].all()  # the pads stay attended, as in Janus' unconditional row
    np.testing.assert_array_equal(unc["gen_loss_mask"], cond["gen_loss_mask"])
    # The sampler's CFG prefixes are the same rows' prefixes.
    assert builder.t2i_prefix("a red cube", cond=False) == list(unc["tokens"][:g])
    assert builder.t2i_prefix("a red cube") == list(cond["tokens"][:g])


def test_proxy_layout_and_instruction_dropout_keeps_image(builder):
    ids = builder.ids
    img, target = _img(2), _img(3)
    for drop in (False, True):
        ex = builder.proxy("segmentation", img, "segment the instances one colour each", target, drop)
        n = _check_common(ex, ids)
        t, g = ex["tokens"], int(ex["gen_start"])
        assert int(ex["vit_start"]) == 2 and t[1] == ids.img and t[2 + V] == ids.img_end
        assert t[g - 1] == ids.boi and t[g + N] == ids.eoi and n == g + N + 1
        instr = t[3 + V:g - 1]
        assert len(instr) > 0 and ((instr == ids.pad).all() if drop else (instr != ids.pad).all())
        # The image condition is never dropped.
        np.testing.assert_allclose(ex["vit_image"], seq.vit_pixels(img, 16))
        assert np.abs(ex["vit_image"]).sum() > 0
        assert ex["gen_loss_mask"].sum() == N and ex["gen_loss_mask"][g - 1] == 1 and ex["gen_loss_mask"][g + N - 1] == 0
        assert ex["text_loss_weight"].sum() == 0
        assert int(ex["task"]) == TASKS.index("proxy_segmentation")
        prefix, vs = builder.proxy_prefix("segment the instances one colour each", cond=not drop)
        assert prefix == list(t[:g]) and vs == 2


def test_truncation_keeps_fixed_spans(builder):
    long_q = " ".join(["how many red objects are there"] * 20)
    ex = builder.understanding(_img(), long_q, "two")
    assert int(ex["truncated"]) == 1 and int(ex["attn_mask"].sum()) == L
    assert ex["tokens"][L - 1] == builder.ids.eos and ex["text_loss_weight"].sum() == pytest.approx(1.5 * 2)
    ex = builder.text_to_image(" ".join(["a red cube"] * 30), _img(), drop=False)
    assert int(ex["truncated"]) == 1 and ex["gen_loss_mask"].sum() == N and ex["tokens"][L - 1] == builder.ids.eoi
    small = seq.SequenceBuilder(seq.Layout(max_seq_len=10, num_vit_tokens=V, vit_image_size=16, num_codes=N,
                                           image_size=24), builder.ids, builder.encode)
    with pytest.raises(ValueError, match="max_seq_len"):
        small.proxy("depth", _img(), "x", _img(), drop=False)


def test_target_resampling_label_maps_stay_exact(builder):
    # A flat-colour label map at another size is resampled with nearest: no new colours appear.
    lab = np.zeros((48, 48, 3), np.uint8)
    lab[:24, :24] = (255, 0, 0)
    lab[24:, 10:40] = (0, 0, 255)
    ex = builder.proxy("segmentation", _img(), "segment", lab, drop=False, nearest=True)
    colours = {tuple(c) for c in ex["target_image"].reshape(-1, 3)}
    assert colours <= {(0, 0, 0), (255, 0, 0), (0, 0, 255)} and ex["target_image"].shape == (24, 24, 3)


def test_format_mcq():
    prompt, answer = seq.format_mcq({"question": "How many cubes?", "choices": ["1", "2", "3"], "answer": 2})
    assert prompt == "How many cubes? (A) 1 (B) 2 (C) 3 Answer:" and answer == "C"


# ---------------------------------------------------------------------------------------------
# task transforms on real Shapes World scenes
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    """Scenes, a byte-level BPE trained on the world's text (io's builder) and a matching builder."""
    from sgt_jax.config import default_config
    from sgt_jax.data import shapes_world
    from sgt_jax.data import tokenizer as tok_lib

    cfg = default_config()
    cfg.data.image_size = 32
    wcfg = shapes_world.WorldConfig(image_size=32)
    tok = tok_lib.wrap(tok_lib.train_bpe(__import__("sgt_jax.data.text", fromlist=["corpus"]).corpus(wcfg, 30), 600))
    layout = seq.Layout(max_seq_len=96, num_vit_tokens=16, vit_image_size=32, num_codes=16, image_size=32,
                        cond_dropout=0.1, caption_fraction=0.25)
    builder = seq.SequenceBuilder(layout, seq.SpecialIds.from_tokenizer(tok), seq.HFEncode(tok))
    scenes = [dict(shapes_world.generate_scene(i, wcfg, "train"), key=str(i)) for i in range(40)]
    return builder, scenes, tok


def test_transforms_are_deterministic_and_picklable(world):
    import pickle

    builder, scenes, _ = world
    for task in TASKS:
        fn = seq.task_transform(builder, task)
        clone = pickle.loads(pickle.dumps(fn))
        for i, scene in enumerate(scenes[:4]):
            a = fn(scene, np.random.default_rng([7, i]))
            b = clone(scene, np.random.default_rng([7, i]))
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), task
            assert int(a["task"]) == TASKS.index(task)
            spec = seq.example_spec(builder.layout)
            assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (s, np.dtype(d)) for k, (s, d) in spec.items()}


def test_proxy_targets_and_inputs_come_from_render_target(world):
    from sgt_jax.data import render, text

    builder, scenes, _ = world
    for proxy in ("segmentation", "depth", "mae"):
        fn = seq.task_transform(builder, f"proxy_{proxy}")
        ex = fn(scenes[0], np.random.default_rng(3))
        # Replay the transform's draws (instruction, dropout) to get the same render rng state.
        rng = np.random.default_rng(3)
        rng.integers(len(text.INSTRUCTIONS[proxy])), rng.random()
        inp, tgt = render.render_target(scenes[0], proxy, rng)
        np.testing.assert_array_equal(ex["target_image"], tgt)
        np.testing.assert_allclose(ex["vit_image"], seq.vit_pixels(inp, 32))
        if proxy != "mae":
            np.testing.assert_array_equal(inp, scenes[0]["image"])  # the ViT sees the scene itself


def test_condition_dropout_rate_and_image_never_dropped(world):
    builder, scenes, _ = world
    n = 1500
    for task in ("t2i", "proxy_segmentation"):
        fn = seq.task_transform(builder, task)
        dropped = 0
        for i in range(n):
            ex = fn(scenes[i % len(scenes)], np.random.default_rng([11, i]))
            g = int(ex["gen_start"])
            start = 1 if task == "t2i" else 3 + builder.layout.num_vit_tokens
            cond = ex["tokens"][start:g - 1]
            assert len(cond) > 0
            dropped += bool((cond == builder.ids.pad).all())
            if task != "t2i":
                assert int(ex["vit_start"]) == 2 and np.abs(ex["vit_image"]).sum() > 0  # never dropped
            assert ex["gen_loss_mask"].sum() == builder.layout.num_codes
        rate = dropped / n
        assert 0.07 < rate < 0.13, (task, rate)  # p = 0.1; 3 sigma ~ 0.023


def test_understanding_mixes_captions_and_mcq_with_letter_answers(world):
    builder, scenes, tok = world
    fn = seq.task_transform(builder, "understanding")
    captions, letters = 0, 0
    for i in range(200):
        ex = fn(scenes[i % len(scenes)], np.random.default_rng([5, i]))
        w = ex["text_loss_weight"] > 0
        answer = tok.decode(ex["tokens"][np.flatnonzero(w) + 1], skip_special_tokens=True).strip()
        if not ex["truncated"]:
            assert ex["tokens"][np.flatnonzero(w)[-1] + 1] == builder.ids.eos
        if answer in ("A", "B", "C", "D", "E", "F", "G", "H"):
            letters += 1
        else:
            captions += 1
            assert len(answer.split()) >= 3
    assert 0.12 < captions / 200 < 0.40 and letters > 100


def test_row_length_is_derived_from_the_mixed_tasks_spans_and_text_rooms():
    from sgt_jax.config import ROW_TOKENS, ConfigError, default_config, finalize

    cfg = default_config()
    cfg.stage = "umm"
    cfg.data.mixture = {"proxy_segmentation": 2.0, "understanding": 1.0}
    finalize(cfg)
    # proxy row: 5 structural + 64 ViT + 64 codes + 48 instruction tokens = 181 -> 192.
    assert ROW_TOKENS["proxy"] == 5 and cfg.data.max_seq_len == 192
    special = seq.SpecialIds(bos=1, eos=2, pad=0, img=3, img_end=4, boi=5, eoi=6)
    builder = seq.SequenceBuilder(seq.Layout.from_config(cfg), special, lambda text: [9] * len(text))
    row = builder.proxy("segmentation", np.zeros((64, 64, 3), np.uint8), "x" * 48, np.zeros((64, 64, 3), np.uint8),
                        drop=False)
    assert int(row["attn_mask"].sum()) == 181 and not row["truncated"]  # the instruction room fits exactly
    cut = builder.proxy("segmentation", np.zeros((64, 64, 3), np.uint8), "x" * 60, np.zeros((64, 64, 3), np.uint8),
                        drop=False)
    assert int(cut["attn_mask"].sum()) == 192 and cut["truncated"]  # the rest of the row to the multiple of 16
    cfg.data.max_seq_len = 134
    with pytest.raises(ConfigError, match="'data.max_seq_len' = 134.*derived"):
        finalize(cfg)
