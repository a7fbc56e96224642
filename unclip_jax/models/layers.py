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


class GroupNorm32(nn.Module):
    """GroupNorm(32 groups, eps 1e-5) computed in float32 and cast back (GLIDE's GroupNorm32)."""

    num_groups: int = 32
    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.GroupNorm(
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
            name="norm",
        )(x.astype(jnp.float32))
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


def attention(q, k, v, mask=None):
    """Softmax attention in float32. q [B, Lq, N, D], k/v [B, Lk, N, D], mask [B, Lk] (True = keep).

    q and k are each scaled by D^-1/4 before the product (GLIDE's order, safe in low precision).
    Returns [B, Lq, N, D] in v's dtype.
    """
    scale = q.shape[-1] ** -0.25
    logits = jnp.einsum("bqnd,bknd->bnqk", q * scale, k * scale).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", weights, v)
