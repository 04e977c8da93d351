"""Building blocks shared by the LLM, the ViT and the UMM heads.

Every parameter is created through `nn.with_logical_partitioning`, so the train step can shard any
model by mapping logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `kv`, `vocab`, ...) onto
mesh axes with the config's rules. Parameters are float32; matmuls run in the compute dtype and
numerically sensitive parts (norm statistics, softmax) run in float32.

Also here: the layer-stack transform (`scanned`: nn.scan + a named remat policy), the attention
kernels behind one `dot_attention` (XLA / cuDNN fused, Pallas splash, explicit probabilities) with
masks described by `AttnSpec`, and the sequence-tiled cross-entropy of a big-vocabulary head.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from absl import logging
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
NEG_INF = -1e30  # masked-logit value; finite so fully masked rows give a uniform softmax, not NaN
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "explicit")

# Remat policies by MaxText's names. Projections are tagged with `checkpoint_name` (query_proj,
# key_proj, value_proj, out_proj, mlpwi, mlpwo) so the name-based policies can pick them.
_QKV = ("query_proj", "key_proj", "value_proj")
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: everything the backward pass needs is stored
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names(*_QKV, "out_proj", "mlpwi", "mlpwo"),
    "save_dots_except_mlp": jax.checkpoint_policies.save_only_these_names(*_QKV, "out_proj"),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(*_QKV),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("out_proj"),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_policy_name(value: str | bool) -> str:
    """Normalise a remat setting: True -> "full", False -> "none", names are checked."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"remat policy {value!r} is not known; allowed: {sorted(REMAT_POLICIES)}")
    return value


def remat(module_cls, policy: str, **kwargs):
    """`nn.remat(module_cls)` under the named policy, or the class itself for "none"."""
    policy = remat_policy_name(policy)
    if policy == "none":
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[policy], **kwargs)


def scanned(layer_cls, cfg_remat, length: int, n_broadcast_before: int, scanned_args: int = 0,
            n_broadcast_after: int = 0, unroll: int = 1):
    """`layer_cls` rematerialised by policy name and scanned over `length` stacked layers.

    The parameters get a leading `layers` axis (logical name "layers"); the call's arguments after
    the carry are broadcast except `scanned_args` of them (sliced along axis 0, e.g. the KV cache).
    `unroll` layers are unrolled per loop iteration (more compile time, sometimes a faster step).
    """
    body = remat(layer_cls, cfg_remat, prevent_cse=False)
    in_axes = (nn.broadcast,) * n_broadcast_before + (0,) * scanned_args + (nn.broadcast,) * n_broadcast_after
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                   length=length, unroll=max(1, min(int(unroll), max(length, 1))),
                   metadata_params={nn.PARTITION_NAME: "layers"})


def tag(x: jax.Array, name: str) -> jax.Array:
    """Name an activation for the remat policies."""
    return checkpoint_name(x, name)


def init(base: nn.initializers.Initializer, names: Sequence[str | None]) -> nn.initializers.Initializer:
    """An initializer whose parameter carries logical axis names (used by the sharding rules)."""
    return nn.with_logical_partitioning(base, tuple(names))


def dense_init(scale: float = 1.0) -> nn.initializers.Initializer:
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Activation sharding hint; a no-op when no mesh / rules are active."""
    return nn.with_logical_constraint(x, tuple(names))


class RMSNorm(nn.Module):
    """RMSNorm as in Llama/Qwen2: statistics in float32, `weight * x` without an offset."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", init(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with logically named scale and bias (ViT / SigLIP)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
                        scale_init=init(nn.initializers.ones, ("embed",)),
                        bias_init=init(nn.initializers.zeros, ("embed",)))


def flat_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                     preferred_element_type=None) -> jax.Array:
    """`lax.dot_general` with lhs's leading (batch-like) axes merged into one before the dot.

    A dense layer (or a tied-embedding head) contracts lhs's last axes with some of rhs's. XLA:CPU
    runs the backward pass of that dot ~5x slower on a [B, L, D] input than on the same data as
    [B*L, D] (the weight gradient, contracted over two axes, goes through a strided 3-D transpose):
    measured 54 vs 11 ms for silu(x @ w) with x [16, 160, 256] and w [256, 1024] on this project's
    CPU. Merging major axes is a bitcast on every backend and keeps a sharding of the leading (batch)
    axis. Any other dimension numbers go to `lax.dot_general` unchanged.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    n = len(lc)
    dense_like = not lb and not rb and tuple(lc) == tuple(range(lhs.ndim - n, lhs.ndim)) and lhs.ndim - n > 1
    if not dense_like:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    lead = lhs.shape[:lhs.ndim - n]
    flat = lhs.reshape((-1,) + lhs.shape[lhs.ndim - n:])
    out = jax.lax.dot_general(flat, rhs, ((tuple(range(1, n + 1)), tuple(rc)), ((), ())), precision=precision,
                              preferred_element_type=preferred_element_type)
    return out.reshape(lead + out.shape[1:])


def dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, *, use_bias: bool = True,
          name: str | None = None, scale: float = 1.0) -> nn.Dense:
    """nn.Dense with logical names (in, out) on the kernel and (out,) on the bias."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=init(dense_init(scale), names),
                    bias_init=init(nn.initializers.zeros, (names[1],)), dot_general=flat_dot_general)


class DenseGeneral(nn.Module):
    """Dense over the last `in_dims` input axes into `features` (e.g. [D] -> [H, hd] or [H, hd] -> [D]).

    Own implementation (not nn.DenseGeneral) so the logically named kernel is created in its true
    multi-axis shape (flax's version inits a flattened kernel, which breaks sharding at init) and
    fan-in counts all contracted axes.
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]  # logical names of the kernel: contracted axes, then feature axes
    in_dims: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = self.in_dims, len(self.features)
        shape = tuple(x.shape[-n_in:]) + tuple(self.features)
        scale = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                 in_axis=tuple(range(n_in)),
                                                 out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", init(scale, self.names), shape, jnp.float32)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = flat_dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", init(nn.initializers.zeros, self.names[n_in:]), tuple(self.features),
                              jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the Llama/Qwen2 "rotate half" layout.

    x: [B, L, H, D]; positions: int [B, L]. Angles are computed in float32.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@flax.struct.dataclass
class AttnSpec:
    """Which keys each query sees, plus the static switches of one attention call.

    Masks are described, never materialised as [L, L] biases: `kv_lengths` int32[B] (keys at
    positions >= length are padding; right-padded rows), `segment_ids` int32[B, L] for packed rows
    (a query sees keys of its own segment only; 0 = padding), `causal` (key j <= query i). The
    static fields travel as pytree metadata, so a spec passes through `nn.scan` / remat unchanged.
    """

    kv_lengths: jax.Array | None = None
    segment_ids: jax.Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=True)
    impl: str = flax.struct.field(pytree_node=False, default="xla")
    return_probs: bool = flax.struct.field(pytree_node=False, default=False)
    decode: bool = flax.struct.field(pytree_node=False, default=False)
    return_hidden: bool = flax.struct.field(pytree_node=False, default=False)


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r} is not known; allowed: {ATTENTION_IMPLS}")
    return impl


def attention_mask(spec: AttnSpec, lq: int, lk: int) -> jax.Array:
    """Boolean mask broadcastable to [B, 1, Lq, Lk] (True = attend), built from the spec.

    With `causal`, query i of Lq sits at key position i + (Lk - Lq) (the queries are the last Lq
    positions), which also covers Lq == Lk.
    """
    ok = jnp.ones((1, 1, lq, lk), bool)
    if spec.causal:
        ok = ok & (jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq))[None, None]
    if spec.kv_lengths is not None:
        ok = ok & (jnp.arange(lk)[None, :] < spec.kv_lengths[:, None])[:, None, None, :]
    if spec.segment_ids is not None:
        seg = spec.segment_ids
        ok = ok & (seg[:, -lq:, None] == seg[:, None, :])[:, None]
    return ok


def explicit_attention(q, k, v, spec: AttnSpec, return_probs: bool = False):
    """Grouped-query attention with float32 logits and softmax, returning the probabilities.

    q: [B, Lq, H, D]; k, v: [B, Lk, KVH, D] with H a multiple of KVH. The reference path, and the
    one the attention analysis (`return_attn`) needs. Returns ([B, Lq, H, D], probs [B, H, Lq, Lk]).
    """
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, lq, kvh, h // kvh, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    mask = attention_mask(spec, lq, k.shape[1])[:, :, None]  # [B, 1, 1, Lq, Lk] over (kvh, g)
    probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).reshape(b, lq, h, d)
    return out, (probs.reshape(b, h, lq, -1) if return_probs else None)


def cached_attention(q, k, v, spec: AttnSpec, return_probs: bool = False):
    """Attention of a few queries over a head-major KV cache (decode steps).

    q: [B, Lq, H, D]; k, v: [B, KVH, S, D], the cache's layout, so both products are plain batched
    matmuls over (B, KVH). With the cache as [B, S, KVH, D], XLA:CPU transposed the whole layer's
    cache on every decode step (42% of the sampler's op time). Float32 logits and softmax, masked by
    the spec (`decode_spec`: keys below each row's length). Returns ([B, Lq, H, D], probs
    [B, H, Lq, S] or None).
    """
    b, lq, h, d = q.shape
    kvh, length = k.shape[1], k.shape[2]
    qg = jnp.swapaxes(q.reshape(b, lq, kvh, h // kvh, d), 1, 2).reshape(b, kvh, lq * (h // kvh), d)
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    logits = logits.reshape(b, kvh, lq, h // kvh, length)
    mask = attention_mask(spec, lq, length)[:, :, :, None]  # [B, 1, Lq, 1, S] over (kvh, g)
    probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, kvh, -1, length).astype(v.dtype), v)
    out = jnp.swapaxes(out.reshape(b, kvh, lq, h // kvh, d), 1, 2).reshape(b, lq, h, d)
    return out, (jnp.moveaxis(probs, 2, 3).reshape(b, h, lq, length) if return_probs else None)


def fused_attention(q, k, v, spec: AttnSpec, implementation: str | None = None):
    """`jax.nn.dot_product_attention` (XLA or cuDNN): causality and lengths go in as arguments; a
    boolean mask is built only for packed rows (segment ids) or a causal query suffix."""
    lq, lk = q.shape[1], k.shape[1]
    causal = spec.causal and lq == lk
    mask = None
    if spec.segment_ids is not None or (spec.causal and not causal):
        mask = attention_mask(spec.replace(causal=spec.causal and not causal, kv_lengths=None), lq, lk)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        key_value_seq_lengths=spec.kv_lengths, implementation=implementation)


def _splash_local(q, k, v, seg, causal: bool, interpret: bool):
    """Splash attention on one device's shard: q [B, H, L, D] (pre-scaled), k / v [B, KVH, L, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    h, length = q.shape[1], q.shape[2]
    one = sm.CausalMask((length, length)) if causal else sm.FullMask((length, length))
    block = next((n for n in (512, 256, 128) if length % n == 0), length)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * h), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    return jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=sk.SegmentIds(q=s, kv=s)))(q, k, v, seg)


SPLASH_BLOCK = 128  # splash's smallest TPU block: sequences are padded up to a multiple of it


def splash_shards_evenly(batch: int, heads: int) -> bool:
    """Whether the per-shard splash kernel can split this batch and these heads over the current mesh
    (the logical rules of `batch` and `heads`). The 1-row dummy batch that builds the params does
    not split over a 64-way FSDP axis; such calls (shape-only) use XLA attention instead."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))

    def ways(axes) -> int:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out = 1
        for a in axes:
            out *= int(sizes.get(a, 1))
        return out

    batch_ax, heads_ax = nn.logical_to_mesh_axes(("batch", "heads"))
    even = batch % ways(batch_ax) == 0 and heads % ways(heads_ax) == 0
    if not even and batch > 1:  # not the 1-row params-init call: say so rather than fall back silently
        logging.warning("splash attention: batch %d / heads %d do not split over the mesh (%s ways / %s ways); "
                        "this call uses XLA attention", batch, heads, ways(batch_ax), ways(heads_ax))
    return even


def splash_attention(q, k, v, spec: AttnSpec):
    """Pallas splash attention (TPU; interpreted elsewhere, for tests). Lengths become segment ids
    (0 = padding), so one kernel covers padded and packed rows. Needs Lq == Lk; a length that is not
    a multiple of SPLASH_BLOCK is padded with segment-0 positions (queries there are discarded, and
    no real query sees them), so the ViT's 576 tokens run the kernel too.

    Under a mesh the kernel runs per shard (`jax.shard_map`): batch and heads split as the logical
    rules split `batch` and `heads`; K/V follow `kv_heads`, or are repeated to the query heads when
    that axis is sharded differently; the sequence stays whole on each device.
    """
    b, length, h, d = q.shape
    if k.shape[1] != length:
        raise ValueError(f"splash attention needs as many keys as queries; got {length} and {k.shape[1]}")
    seg = spec.segment_ids
    if seg is None:
        lengths = spec.kv_lengths if spec.kv_lengths is not None else jnp.full((b,), length, jnp.int32)
        seg = (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)
    seg = seg.astype(jnp.int32)
    pad = -length % SPLASH_BLOCK
    if pad:  # e.g. SigLIP's 576 tokens -> 640: the added positions are segment 0 (padding), cut after
        widen = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widen) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)))
        return splash_attention(q, k, v, spec.replace(segment_ids=seg, kv_lengths=None))[:, :length]
    qt = jnp.swapaxes(q * jnp.asarray(d ** -0.5, q.dtype), 1, 2)  # [B, H, L, D]; splash does not scale
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    mesh = jax.sharding.get_abstract_mesh()
    # The Mosaic kernel where the program targets TPU (also AOT for a TPU topology from a CPU
    # host, where the mesh's devices say so); the Pallas interpreter elsewhere (tests on CPU).
    device = None if mesh.empty else mesh.abstract_device
    interpret = (device.platform if device is not None else jax.default_backend()) != "tpu"
    if mesh.empty:
        out = _splash_local(qt, kt, vt, seg, spec.causal, interpret)
    else:
        batch_ax, heads_ax, kv_ax = nn.logical_to_mesh_axes(("batch", "heads", "kv_heads"))
        if kv_ax != heads_ax:  # e.g. K/V replicated while query heads are split: give K/V the query heads
            kt, vt = (jnp.repeat(x, h // x.shape[1], axis=1) for x in (kt, vt))
            kv_ax = heads_ax
        P = jax.sharding.PartitionSpec
        qs, ks = P(batch_ax, heads_ax, None, None), P(batch_ax, kv_ax, None, None)
        fn = jax.shard_map(lambda a, b_, c, s_: _splash_local(a, b_, c, s_, spec.causal, interpret), mesh=mesh,
                           in_specs=(qs, ks, ks, P(batch_ax, None)), out_specs=qs, check_vma=False)
        out = fn(qt, kt, vt, seg)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttnSpec,
                  return_probs: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Grouped-query attention by `spec.impl`; the explicit path whenever probabilities are asked for.

    q: [B, Lq, H, D]; k, v: [B, Lk, KVH, D]. Returns ([B, Lq, H, D], probs [B, H, Lq, Lk] or None).
    Single-query decode steps (and any Lq != Lk) use XLA under "splash"; so does "cudnn" off GPU or
    in float32 (cuDNN's fused attention takes bf16 / fp16 only).
    """
    impl = check_impl(spec.impl)
    if return_probs or impl == "explicit":
        return explicit_attention(q, k, v, spec, return_probs)
    if impl == "splash" and q.shape[1] == k.shape[1] > 1 and splash_shards_evenly(q.shape[0], q.shape[2]):
        return splash_attention(q, k, v, spec), None
    cudnn = impl == "cudnn" and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return fused_attention(q, k, v, spec, "cudnn" if cudnn else "xla"), None


def chunked_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, chunk: int,
                          layout: str = "dv") -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy of `h @ w` against integer `targets`, `chunk` positions at a time.

    h: [B, L, D] (compute dtype); w: the head matrix, [D, V] (layout "dv") or [V, D] ("vd", a tied
    embedding table); targets int [B, L]. Each tile's float32 logits are rematerialised in the
    backward pass, so at most [B, chunk, V] logits exist at once. Returns (ce float32 [B, L],
    argmax hit bool [B, L]).
    """
    b, length, _ = h.shape
    chunk = max(1, min(int(chunk), length))
    n = -(-length // chunk)
    pad = n * chunk - length
    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    tp = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hp.reshape(b, n, chunk, -1).swapaxes(0, 1)
    ts = tp.reshape(b, n, chunk).swapaxes(0, 1)
    dims = (((2,), (0,) if layout == "dv" else (1,)), ((), ()))

    @jax.checkpoint
    def tile(args):
        hh, tt = args
        logits = flat_dot_general(hh, w.astype(hh.dtype), dims, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tt[..., None], axis=-1)[..., 0]
        return lse - picked, jnp.argmax(logits, axis=-1) == tt

    ce, hit = jax.lax.map(tile, (hs, ts))
    ce = ce.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]
    hit = hit.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]
    return ce, hit
