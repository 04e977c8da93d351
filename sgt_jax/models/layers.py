"""Building blocks shared by the LLM, the ViT and the UMM heads.

Every parameter is created through `nn.with_logical_partitioning`, so the train step can shard any
model by mapping logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `kv`, `vocab`, ...) onto
mesh axes with the config's rules. Parameters are float32; matmuls run in the compute dtype and
numerically sensitive parts (norm statistics, softmax) run in float32.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NEG_INF = -1e30  # additive mask value; finite so fully masked rows give a uniform softmax, not NaN


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


def dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, *, use_bias: bool = True,
          name: str | None = None, scale: float = 1.0) -> nn.Dense:
    """nn.Dense with logical names (in, out) on the kernel and (out,) on the bias."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=init(dense_init(scale), names),
                    bias_init=init(nn.initializers.zeros, (names[1],)))


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
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
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


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                  return_probs: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Grouped-query attention.

    q: [B, Lq, H, D]; k, v: [B, Lk, KVH, D] with H a multiple of KVH; bias: additive float32
    broadcastable to [B, 1, Lq, Lk] (0 = attend, NEG_INF = masked). Logits and softmax in float32.
    Returns ([B, Lq, H, D], probs [B, H, Lq, Lk] float32 or None).
    """
    b, lq, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, lq, kvh, g, d)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    if bias is not None:
        logits = logits + bias[:, :, None]  # [B, 1, 1, Lq, Lk] over (kvh, g)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v)
    out = out.reshape(b, lq, h, d)
    return out, (probs.reshape(b, h, lq, -1) if return_probs else None)
