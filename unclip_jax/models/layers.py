"""Layers shared by the networks."""

from __future__ import annotations

import math

import jax.numpy as jnp


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
