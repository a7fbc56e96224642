"""Layers shared by the networks."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import axes


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], cos first.

    freqs_i = exp(-ln(max_period) i / half), i < half = dim // 2; [cos(t f), sin(t f)], zero-padded
    when dim is odd (GLIDE/ADM's `timestep_embedding`, diffusers' flip_sin_to_cos=True, shift 0).
    Computed in float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


# ------------------------------------------------------------------------------------------------
# Linear, convolution and normalisation layers with logical axis names on every parameter.

Dtype = Any


def dense(
    features: int,
    names: tuple[str | None, str | None],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    zero_init: bool = False,
    use_bias: bool = True,
    name: str | None = None,
) -> nn.Dense:
    """nn.Dense whose kernel is annotated `names` (in, out) and whose bias is annotated (out,)."""
    init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    strides: int = 1,
    zero_init: bool = False,
    name: str | None = None,
) -> nn.Conv:
    """A 'same'-padded NHWC convolution, kernel annotated (None, None, conv_in, conv_out)."""
    init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=[(kernel_size // 2, kernel_size // 2)] * 2,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(init, (None, None, axes.CONV_IN, axes.CONV_OUT)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.CONV_OUT,)),
        name=name,
    )


def silu(x):
    """x * sigmoid(x), with the sigmoid written as 0.5 + 0.5 tanh(x / 2) (the same function).

    XLA's CPU backend lowers `jax.nn.silu`'s logistic through YNNPACK at ~3.5x the cost of tanh
    (12.4 ms against 3.5 ms at [8, 64, 64, 128], benchmarks/results/karlo_small_cpu.json).
    """
    return x * (0.5 + 0.5 * jnp.tanh(0.5 * x))


def group_norm(x, scale, bias, num_groups: int, epsilon: float):
    """GroupNorm of [B, ..., C] over the spatial axes and each group's channels, in float32.

    The statistics are per-channel sums over the spatial axes (a contiguous column reduction in
    NHWC), folded to groups on the small [B, C] result, and the normalisation is one fused
    multiply-add per element. Written out because flax's GroupNorm reduces over a strided
    [B, HW, G, C/G] view, which XLA's CPU backend runs ~6x slower at the UNet's shapes
    (benchmarks/results/karlo_small_cpu.json, `diagnosis`). Variance is E[x^2] - E[x]^2, as flax's
    default `use_fast_variance`, clamped at 0.
    """
    b, c = x.shape[0], x.shape[-1]
    if c % num_groups:
        raise ValueError(f"{c} channels do not split into {num_groups} groups")
    flat = x.reshape(b, -1, c)
    count = flat.shape[1] * (c // num_groups)
    sums = jnp.sum(flat, axis=1).reshape(b, num_groups, -1).sum(-1)
    squares = jnp.sum(flat * flat, axis=1).reshape(b, num_groups, -1).sum(-1)
    mean = sums / count
    inv = jax.lax.rsqrt(jnp.maximum(squares / count - mean * mean, 0.0) + epsilon)  # [B, G]
    per_channel = scale.reshape(num_groups, -1) * inv[:, :, None]  # [B, G, C/G]
    offset = bias.reshape(num_groups, -1) - mean[:, :, None] * per_channel
    shape = (b,) + (1,) * (x.ndim - 2) + (c,)
    return x * per_channel.reshape(shape) + offset.reshape(shape)


class _GroupNormParams(nn.Module):
    """Holds GroupNorm's scale and bias under the name flax's nn.GroupNorm gives them."""

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        names = (axes.NORM,)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, names),
            (self.features,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, names),
            (self.features,),
            self.param_dtype,
        )
        return scale, bias


class GroupNorm32(nn.Module):
    """GroupNorm(32 groups, eps 1e-5) computed in float32 and cast back (GLIDE's GroupNorm32).

    Parameters live at `norm/scale` and `norm/bias`, as they did under flax's nn.GroupNorm.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale, bias = _GroupNormParams(x.shape[-1], self.param_dtype, name="norm")()
        y = group_norm(
            x.astype(jnp.float32),
            scale.astype(jnp.float32),
            bias.astype(jnp.float32),
            self.num_groups,
            self.epsilon,
        )
        return y.astype(x.dtype)


def layer_norm(param_dtype: Dtype, epsilon: float = 1e-5, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm in float32 (cast the input first), scale and bias annotated (norm,)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
        name=name,
    )


# From this many logits per head, [B, Lq, Lk] (a batch of 8 at the 32x32 attention of a 64 px
# UNet), attention on the CPU backend loops over (head, query block): a [B, 128, Lk] block of
# logits stays in cache instead of streaming [B, N, Lq, Lk] through memory five times (dot,
# mask, max, exp-sum, normalise). Forward at batch 8, head dim 32: 177 -> 73 ms at 1024 x 1105
# logits and 49 -> 17 ms at 512 x 593, but 5.7 -> 16 ms at 256 x 337, where the dense form
# fits in cache (the crossover lies between 0.7M and 2.3M logits per head; measured on the
# development CPU, docs/architecture.md "Performance and compilation"). Accelerators keep the
# one-shot form.
_CPU_BLOCK_LOGITS = 2**20
_CPU_QUERY_BLOCK = 128


def _softmax_attend(q, k, v, mask):
    """q [..., Lq, D] (already scaled), k/v [..., Lk, D], mask [..., Lk] or None -> [..., Lq, D].

    The normalisation is deferred to the [.., Lq, D] output, so the [Lq, Lk] weights are never
    rescaled in memory. Logits and their softmax are float32.
    """
    logits = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[..., None, :], logits, jnp.finfo(jnp.float32).min)
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits)
    out = jnp.einsum("...qk,...kd->...qd", weights.astype(v.dtype), v).astype(jnp.float32)
    return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(v.dtype)


def _blocked_attention(q, k, v, mask, block: int):
    """`attention` as a loop over (head, query block) with the batch inside each step."""
    b, lq, n, d = q.shape
    blocks = lq // block
    # [B, Lq, N, D] -> [N * blocks, B, block, D]; K/V -> [N, B, Lk, D].
    qb = q.reshape(b, blocks, block, n, d).transpose(3, 1, 0, 2, 4).reshape(n * blocks, b, block, d)
    kh, vh = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)
    head = jnp.repeat(jnp.arange(n), blocks)

    def step(args):
        qi, i = args
        return _softmax_attend(qi, kh[i], vh[i], mask)

    out = jax.lax.map(step, (qb, head))  # [N * blocks, B, block, D]
    return out.reshape(n, blocks, b, block, d).transpose(2, 1, 3, 0, 4).reshape(b, lq, n, d)


def attention(q, k, v, mask=None, *, implementation: str | None = None):
    """Softmax attention in float32. q [B, Lq, N, D], k/v [B, Lk, N, D], mask [B, Lk] (True = keep).

    Mathematically GLIDE's QKV attention (q and k each scaled by D^-1/4; here the product is
    scaled by D^-1/2 once). Returns [B, Lq, N, D] in v's dtype.
    implementation: None picks by backend and size ('blocked' on CPU for large per-head logits,
    'dense' otherwise); 'dense' or 'blocked' forces one (the tests compare the two).
    """
    lq, lk = q.shape[1], k.shape[1]
    if implementation is None:
        large = q.shape[0] * lq * lk >= _CPU_BLOCK_LOGITS and lq % _CPU_QUERY_BLOCK == 0
        implementation = "blocked" if large and jax.default_backend() == "cpu" else "dense"
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    if implementation == "blocked":
        block = math.gcd(lq, _CPU_QUERY_BLOCK)
        return _blocked_attention(q, k, v, mask, block)
    if implementation != "dense":
        raise ValueError(f"unknown attention implementation {implementation!r}: dense or blocked")
    heads_major = [jnp.swapaxes(a, 1, 2) for a in (q, k, v)]  # [B, N, L, D]
    out = _softmax_attend(*heads_major, None if mask is None else mask[:, None, :])
    return jnp.swapaxes(out, 1, 2)
