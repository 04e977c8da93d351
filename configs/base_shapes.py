"""Stage 1: base UMM pretraining from scratch on Shapes World (understanding + text-to-image).

    python tools/train.py --config=configs/base_shapes.py --workdir=runs/base

Loads the frozen VQ from the VQ stage (`init_from.path`, default runs/vq, mapped to params/vq); its
`model.vq` section and image size are copied from configs/vq_shapes.py (with `vqarg`, e.g.
`vqarg=f8`), so they must name the VQ run's own config. Sized for the `make demo` budget on a 2-core
CPU: a 4 x 256 decoder (GQA 4/2 heads), a 2-block ViT (patch 8 at 64 px -> 64 tokens) and as many
code positions as the VQ gives (f = 4: 256, f = 8: 64).

Derived after overrides (`sgt_jax.config.finalize`): the row length from the ViT and code spans plus
the text rooms (`data.answer_room`, `data.prompt_room`), and the step count from the example budget
`train.num_examples`, which this file sets from a fixed budget of sequence positions
(`BASE_POSITIONS`) at the reference batch of 32: a longer code span trains fewer examples at the same
cost (~6-8 min here), and `--config.train.batch_size=64` trains the same examples in half the steps.

Options (OPTIONS): `smoke` (tiny, for tests), `vq=PATH` (VQ workdir), `vqarg=A` (arg of
configs/vq_shapes.py), `steps=N` (N steps at this file's batch size: `train.num_examples` = N x batch),
`quick` (the recipe of the issue-12 base search, results/base_search/: 32 px images with the f=8 VQ
of `vq_shapes.py:f8,size=32` (16 ViT tokens, 16 codes), understanding : t2i = 3 : 1 with captions on
10% of understanding rows, 48 positions of answer room, 5000 steps; 80 min on 2 cores, so the demo
starts from the base this trained, shipped in assets/).
"""
from sgt_jax.config import config_module, default_config, parse_arg, row_lengths

BASE_POSITIONS = 300 * 32 * 144  # sequence positions trained by the base stage (batch x steps x length)
REFERENCE_BATCH = 32
OPTIONS = dict(smoke=False, vq="runs/vq", vqarg="", steps=0, quick=False)
QUICK_VQARG = "f8,size=32"  # the VQ the quick recipe reads (configs/vq_shapes.py options)
QUICK_STEPS = 5000


def load_sibling(name: str, arg=None):
    """get_config(arg) of another file in configs/ (configs/ is not a package)."""
    return config_module(f"{name}.py", __file__).get_config(arg)


def round_up(n: int, m: int = 16) -> int:
    return -(-n // m) * m


def position_budget(positions: int, row_length: int) -> int:
    """Examples that train `positions` sequence positions on rows of `row_length` (whole reference
    batches, at least 50 of them)."""
    return REFERENCE_BATCH * max(50, positions // (REFERENCE_BATCH * round_up(row_length)))


def umm_model(c, smoke: bool, vqarg: str = "", quick: bool = False) -> None:
    """The Shapes World UMM shared by the base and post-training configs (and the VQ it reads)."""
    vqarg = vqarg or (QUICK_VQARG if quick and not smoke else "")
    vq = load_sibling("vq_shapes", ",".join(p for p in (vqarg, "smoke" if smoke else "") if p))
    c.model.vq = vq.model.vq
    c.data.image_size = vq.data.image_size  # the VQ (and its dataset) fix the image size
    c.data.train_size, c.data.validation_size = vq.data.train_size, vq.data.validation_size
    c.data.test_size, c.data.heldout_size = vq.data.test_size, vq.data.heldout_size  # one dataset build
    # Text room per row, measured with the Shapes World BPE (512 ids): MCQ prompts <= 41 tokens + a
    # letter; captions median 51, max ~90 (the longest ~15% lose their tail); t2i prompts <= 34;
    # proxy instructions <= 46.
    c.data.answer_room, c.data.prompt_room, c.data.instruction_room = 72, 36, 48
    if quick and not smoke:  # captions are 10% of understanding rows here: their long tail is cut
        c.data.answer_room, c.data.caption_fraction = 48, 0.1
    u = c.model.umm
    u.llm.vocab_size = c.data.tokenizer_vocab_size  # the Shapes World byte-level BPE built for this data
    if smoke:
        u.llm.width, u.llm.depth, u.llm.num_heads, u.llm.num_kv_heads, u.llm.head_dim, u.llm.mlp_dim = (
            64, 2, 2, 1, 32, 128)
        u.vit.image_size, u.vit.patch_size, u.vit.width, u.vit.depth, u.vit.num_heads, u.vit.mlp_dim = (
            c.data.image_size, 16, 32, 1, 2, 64)
        u.gen_embed_dim, u.gen_adapter_dim, u.gen_head_dim, u.und_adapter_dim = 16, 64, 64, 64
    else:
        u.llm.width, u.llm.depth, u.llm.num_heads, u.llm.num_kv_heads, u.llm.head_dim, u.llm.mlp_dim = (
            256, 4, 4, 2, 64, 768)
        u.vit.image_size, u.vit.patch_size, u.vit.width, u.vit.depth, u.vit.num_heads, u.vit.mlp_dim = (
            c.data.image_size, 8, 128, 2, 4, 512)
        u.gen_embed_dim, u.gen_adapter_dim, u.gen_head_dim, u.und_adapter_dim = 64, 256, 256, 256


def get_config(arg=None):
    a = parse_arg(arg, **OPTIONS)
    c = default_config()
    c.stage = "umm"
    umm_model(c, a.smoke, a.vqarg, a.quick)
    c.init_from.path = a.vq
    c.init_from.mapping = "->vq"  # the whole VQ-stage tree becomes params/vq (frozen)

    c.data.mixture = {"understanding": 3.0 if a.quick else 1.0, "t2i": 1.0}
    c.data.cond_dropout = 0.1
    c.model.umm_stage.freeze_vit = False

    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"
    c.optim.end_lr_fraction = 0.1
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.0
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.clip_norm = 1.0

    c.train.batch_size = 32
    rows = row_lengths(c)
    c.train.steps = -1  # derived from the example budget by finalize
    c.train.num_examples = position_budget(BASE_POSITIONS, max(rows["understanding"], rows["t2i"]))
    c.train.log_every = 25
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 1
    c.eval.every_steps = 0
    c.eval.num_examples = 128
    c.eval.split = "validation"
    if a.quick:
        c.train.num_examples = QUICK_STEPS * c.train.batch_size
        c.checkpoint.every_steps = 1000
        c.model.umm.llm.scan_unroll = 4  # 0.81x the step time of 1 here (tools/bench.py, base_shapes)
    if a.smoke:
        c.train.batch_size = 8
        c.train.num_examples = 6 * 8
        c.train.log_every = 2
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 1
        c.checkpoint.every_steps = 100
        c.eval.num_examples = 16
        c.train.tensorboard = False
    if a.steps:
        c.train.num_examples = a.steps * c.train.batch_size
    return c
