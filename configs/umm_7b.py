"""Real scale: SGT post-training of a Janus-Pro-7B-shaped UMM on a Cloud TPU v5p pod.

Same recipe, ViT, VQ, data and options as configs/umm_1b.py; the decoder is 30 x 4096, 32 heads
(MHA), SwiGLU 11008, vocab 102400. Mesh: FSDP over the pod x tensor parallelism 4 inside a host
(`mesh.shape = (1, -1, 4)`: heads, MLP and vocab split 4 ways; `tensor=T` changes it).

    python tools/train.py --config=configs/umm_7b.py:proxy=segmentation,init=gs://.../janus_pro_7b_sgt_jax
"""
from sgt_jax.config import config_module

SHAPE = {  # Janus-Pro-7B
    "llm": dict(vocab_size=102400, width=4096, depth=30, num_heads=32, num_kv_heads=32, head_dim=128,
                mlp_dim=11008),
    "tensor": 4,
    # One pass per step. TPU compiler (tools/dry_run.py --topology, remat full): v5p-256 at 4 rows per
    # shard in one pass 5.58 GiB/chip of 95; v5p-128 with 8 microbatches 3.26 GiB (README table).
    "grad_accum_steps": 1,
    "remat": True,
}


def get_config(arg=None):
    return config_module("umm_1b.py", __file__).build(arg, SHAPE)
