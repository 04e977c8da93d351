"""Real scale: SGT post-training of a Janus-Pro-1B-shaped UMM on a Cloud TPU v5p pod.

    python tools/train.py --config=configs/umm_1b.py:proxy=segmentation,init=gs://.../janus_pro_1b_sgt_jax

Shape (Janus-Pro-1B): decoder 24 x 2048, 16 heads (MHA), SwiGLU 5632, vocab 102400, untied head;
SigLIP-L/16 at 384 px (24 blocks x 1024, 576 tokens, exact GELU) -> 2-layer GELU adapter; LlamaGen
VQ-16 as published (`llamagen` family, f = 16, 16384 codes of dim 8) -> 24 x 24 = 576 codes per image,
8-dim code embedding,
generation head 2048 -> 2048 -> 16384. bf16 compute, fp32 params, no remat (2 microbatches). Mesh: FSDP over the whole
pod (`mesh.shape = (1, -1, 1)`): every parameter and the optimizer state are sharded on `embed`.

Recipe (SGT paper, Janus-style optimiser): proxy : understanding = 2 : 1 by batch, loss
1.5 x text CE + 1.0 x code CE, AdamW (0.9, 0.95), wd 0, clip 1.0, constant lr after warmup,
everything trains except the VQ; instruction dropped 10%, image never.

Options (OPTIONS): `proxy=NAME|none` (default segmentation), `init=PATH` (UMM checkpoint holding the
converted LLM/ViT and the VQ under params/vq, e.g. `tools/convert_checkpoint.py --janus=DIR --out=PATH`;
"" = from scratch), `tokenizer=DIR` (local HF tokenizer, e.g. PATH/tokenizer of the conversion),
`tensor=T` (tensor-parallel width, 0 = the shape's default), `accum=A` (micro-batches per step, 0 =
the shape's default), `pack=K` (pack up to K examples per 2048-position row, `data.packing`; 0 = one
example per row: each packed example brings its own ViT and target-image slot, so VQA rows of a few
hundred text tokens share a row), `smoke` (same family, tiny, CPU tests).
Data: `data=shapes` (default) the built-in Shapes World rendered at 384 px; `data=real` reads
SAM-SGT (`seg=sam_sgt`, `sam=DIR`) or COCO panoptic (`seg=coco_panoptic`, `coco=DIR`) for the proxy
and LLaVA-OneVision (`llava=DIR`) for VQA, 2 : 1 by batch; needs `tokenizer=DIR`.
"""
from sgt_jax.config import PROXIES, ConfigError, default_config, parse_arg

SHAPE = {  # Janus-Pro-1B
    "llm": dict(vocab_size=102400, width=2048, depth=24, num_heads=16, num_kv_heads=16, head_dim=128, mlp_dim=5632),
    "tensor": 1,
    # Drop remat (no forward recompute: ~1/4 of the step's FLOPs) and run 2 microbatches of 2 rows per
    # shard: 42.8 GiB/chip of 95 on v5p-64 (TPU compiler, README table).
    "remat": False,
    "grad_accum_steps": 2,
}


OPTIONS = dict(proxy="segmentation", init="", tokenizer="", tensor=0, accum=0, pack=0, smoke=False, data="shapes",
               seg="sam_sgt", sam="", coco="", llava="")


def build(arg, shape) -> "ml_collections.ConfigDict":  # noqa: F821
    """Shared by umm_1b / umm_7b: everything but the decoder shape and the mesh."""
    a = parse_arg(arg, **OPTIONS)
    smoke, proxy = a.smoke, a.proxy
    if proxy not in ("none",) + PROXIES:
        raise ConfigError(f"option 'proxy' = {proxy!r} is not allowed; allowed: {['none', *PROXIES]}")
    c = default_config()
    c.stage = "umm"
    c.init_from.path = a.init
    c.init_from.mapping = ""
    c.data.tokenizer_dir = a.tokenizer
    c.data.mixture = {"understanding": 1.0} if proxy == "none" else {f"proxy_{proxy}": 2.0, "understanding": 1.0}
    c.data.cond_dropout = 0.1
    c.data.text_loss_weight, c.data.gen_loss_weight = 1.5, 1.0
    c.data.num_workers = 8

    u, v, vit = c.model.umm, c.model.vq, c.model.umm.vit
    # LlamaGen VQ-16 exactly as published (the `llamagen` family): 16384 l2-normalised 8-dim codes, f = 16.
    v.family, v.codebook_size, v.code_dim, v.downsample = "llamagen", 16384, 8, 16
    v.width, v.channel_mult, v.num_res_blocks, v.z_channels = 128, (1, 1, 2, 2, 4), 2, 256
    for k, val in shape["llm"].items():
        u.llm[k] = val
    u.llm.rope_theta, u.llm.rms_eps = 10000.0, 1e-6
    u.llm.tied_embeddings, u.llm.attn_bias, u.llm.qk_norm = False, False, False
    # SigLIP-L/16 @ 384.
    vit.image_size, vit.patch_size, vit.width, vit.depth, vit.num_heads, vit.mlp_dim = 384, 16, 1024, 24, 16, 4096
    vit.pos, vit.select_layer, vit.post_norm = "learned", -1, True
    vit.gelu_approximate = False  # timm's SigLIP-L in Janus-Pro: exact GELU
    c.data.image_size = 384
    width = u.llm.width
    u.gen_embed_dim, u.gen_adapter_dim, u.gen_head_dim, u.und_adapter_dim = 8, width, width, width
    # <bos><img>[576]</img> instruction <boi>[576]<eoi> = 1157 + instruction: rows of 2048 positions
    # (derived by finalize) leave 891 instruction tokens; VQA questions + answers get the rest.
    c.data.instruction_room, c.data.answer_room, c.data.prompt_room = 891, 1469, 891

    c.optim.lr = 4e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 200
    c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.clip_norm = 0.9, 0.95, 0.0, 1.0
    c.optim.ema_decay = 0.0
    c.train.compute_dtype = "bfloat16"
    c.train.remat = bool(shape.get("remat", True))
    c.train.batch_size = 256
    # Microbatches per step (`accum=N`). TPU compiler numbers per chip (tools/dry_run.py --topology,
    # README table): umm_1b on v5p-64, 4 rows per shard in one pass: 6.22 GiB with full remat,
    # 81.6 GiB (14% headroom) without; without remat in 2 microbatches 42.8 GiB.
    c.optim.grad_accum_steps = a.accum or shape.get("grad_accum_steps", 1)
    c.train.steps = 10000
    c.train.log_every = 20
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.eval.every_steps = 2000
    c.mesh.shape = (1, -1, a.tensor or shape["tensor"])
    if a.pack < 0:
        raise ConfigError(f"option 'pack' = {a.pack!r} is not allowed; allowed: 0 (off) or K > 0 examples per row")
    if a.pack:
        c.data.packing, c.data.packing_max_segments = True, int(a.pack)

    if smoke:  # same family, tiny: Shapes World at 32 px, a few steps on CPU. These shapes are the
        # tiny random Janus of tests/janus_fixture.py, so a converted one loads with init=.
        c.data.image_size = 32
        c.data.num_workers = 0
        c.data.train_size, c.data.validation_size, c.data.test_size, c.data.heldout_size = 64, 16, 16, 16
        v.codebook_size, v.downsample, v.width, v.channel_mult = 64, 8, 32, (1, 1, 2, 2)
        v.num_res_blocks, v.z_channels = 1, 32
        u.llm.vocab_size, u.llm.width, u.llm.depth, u.llm.num_heads, u.llm.num_kv_heads = 1024, 64, 2, 4, 4
        u.llm.head_dim, u.llm.mlp_dim = 16, 96
        vit.image_size, vit.patch_size, vit.width, vit.depth, vit.num_heads, vit.mlp_dim = 32, 8, 32, 2, 2, 64
        u.gen_adapter_dim = u.gen_head_dim = u.und_adapter_dim = 64
        c.data.answer_room, c.data.instruction_room, c.data.prompt_room = 40, 24, 24  # 64-position rows
        c.train.compute_dtype = "float32"
        c.train.batch_size, c.train.steps, c.train.log_every = 8, 4, 2
        c.optim.warmup_steps, c.optim.lr = 1, 1e-3
        c.checkpoint.every_steps = 100
        c.eval.every_steps, c.eval.num_examples = 0, 16
        e = c.eval.umm  # a CPU smoke budget: proves every part runs, measures nothing
        e.splits, e.mcq_items, e.geneval_prompts_per_tag, e.geneval_images_per_prompt = ("test",), 4, 1, 1
        e.seg_images, e.probe_train_scenes, e.probe_test_scenes, e.probe_steps, e.attn_items = 2, 16, 8, 5, 2
        c.mesh.shape = (1, -1, 1)
        c.optim.grad_accum_steps = 1
        c.train.tensorboard = False
    _real_data(c, a, proxy)
    return c


def _real_data(c, a, proxy: str) -> None:
    """`data=real`: SAM-SGT (`seg=sam_sgt`, default) or COCO panoptic (`seg=coco_panoptic`) feed the
    proxy task, LLaVA-OneVision the VQA task, 2 : 1 by batch (the mixture weights above). Local
    copies: `sam=DIR` / `coco=DIR` / `llava=DIR` (built on first use; see tools/build_dataset.py)."""
    mode = a.data
    if mode not in ("shapes", "real"):
        raise ConfigError(f"option 'data' = {mode!r} is not allowed; allowed: ['shapes', 'real']")
    if mode == "shapes":
        return
    seg = a.seg
    if seg not in ("sam_sgt", "coco_panoptic"):
        raise ConfigError(f"option 'seg' = {seg!r} is not allowed; allowed: ['sam_sgt', 'coco_panoptic']")
    sources = {"understanding": "llava_onevision"}
    if proxy != "none":
        sources[f"proxy_{proxy}"] = seg
    c.data.sources = sources
    dirs = {"sam_sgt": a.sam, "coco_panoptic": a.coco, "llava_onevision": a.llava}
    c.data.manual_dirs = {k: v for k, v in dirs.items() if v}
    c.eval.num_examples = 0  # held-out loss needs a validation split; SAM-SGT / LLaVA ship train only


def get_config(arg=None):
    return build(arg, SHAPE)
