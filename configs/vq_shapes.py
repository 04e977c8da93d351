"""Stage 0: the VQ image tokenizer on Shapes World photos + proxy renderings.

    python tools/train.py --config=configs/vq_shapes.py --workdir=runs/vq
    python tools/evaluate.py --config=configs/vq_shapes.py --workdir=runs/vq

Default: a ViT VQ at f = 4 (16 x 16 = 256 codes per 64 px image), width 64, 2 + 2 blocks, an
l2-normalised 2048 x 16 codebook, batch 16, 1200 steps at lr 3e-3 (cosine). Chosen from sweeps
(same code, GPU, fixed step counts) for instance-mask mIoU >= 0.90, pixel accuracy >= 0.98 and test
codebook usage >= 0.5 within the 15-minute CPU budget: a step costs ~0.45 CPU-seconds here, so 1200
steps take ~5-7 minutes on an idle 2-core machine and still fit when it is shared (the
`train.max_wall_minutes` guard stops and checkpoints at 15). More steps help (2400 at lr 2e-3
reached mIoU 0.95 in the sweeps). f = 8 (64 codes, the shorter UMM sequence) tops out near mIoU
0.82 even at 12k steps: small objects need finer codes. Palette masks are over-sampled (3x) and
weighted 2x in the loss because their edges decide mIoU.

Options (OPTIONS; comma-separated): `smoke` (tiny, a few steps, for tests), `f8` (64 codes per
image: UMM-friendly, below the mask bar), `family=conv`, `steps=N` (0 = the default count), `size=N`
(image side in pixels; 0 = 64. The quick UMM recipe uses `f8,size=32`: 16 codes per image, test
instance-mask mIoU 0.52 after 1200 steps, results/base_search/).
The VQ stage sets `train.steps` directly (no example budget).
"""
from sgt_jax.config import default_config, parse_arg

OPTIONS = dict(smoke=False, f8=False, family="vit", steps=0, size=0)


def get_config(arg=None):
    a = parse_arg(arg, **OPTIONS)
    c = default_config()
    c.stage = "vq"
    if a.size:
        c.data.image_size = a.size
    v = c.model.vq
    v.family = a.family
    v.downsample = 8 if a.f8 else 4
    v.codebook_size = 2048
    v.code_dim = 16
    v.width = 64
    v.depth = 2
    v.decoder_depth = 2
    v.num_heads = 4
    v.mlp_ratio = 4
    v.channel_mult = (1, 2, 2) if v.downsample == 4 else (1, 2, 2, 4)
    v.num_res_blocks = 1
    v.beta = 0.25
    v.recon_loss = "l2"
    v.dead_code_reinit_every = 100
    v.dead_code_threshold = 0.1
    v.usage_decay = 0.99
    v.target_mix = "reconstruction:1,segmentation:3,semantic:1,depth:1,edge:1"
    v.mask_loss_weight = 2.0

    c.optim.lr = 3e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.end_lr_fraction = 0.05
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0

    c.train.steps = a.steps or 1200
    c.train.batch_size = 16
    c.train.log_every = 100
    c.train.max_wall_minutes = 15.0  # the tokenizer's CPU budget; a stop here still checkpoints
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 1
    c.eval.every_steps = 0
    c.eval.num_examples = 256
    c.eval.split = "test"

    if a.smoke:
        v.codebook_size, v.code_dim, v.width, v.depth, v.decoder_depth, v.num_heads = 64, 8, 32, 1, 1, 2
        v.downsample = 8
        v.channel_mult = (1, 1, 2, 2)
        v.dead_code_reinit_every = 2
        c.data.train_size, c.data.validation_size, c.data.test_size, c.data.heldout_size = 64, 16, 16, 16
        c.optim.warmup_steps = 1
        c.optim.lr = 3e-3
        c.train.steps = a.steps or 4
        c.train.batch_size = 8
        c.train.log_every = 1
        c.train.max_wall_minutes = 0.0
        c.checkpoint.every_steps = 1000
        c.eval.num_examples = 16
    return c
