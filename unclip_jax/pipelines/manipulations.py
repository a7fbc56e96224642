"""unCLIP's image manipulations in the bipartite latent (z_i, x_T) (SPEC 3.6).

- variations: z_i = CLIP image embedding, x_T = DDIM inversion of the image with the decoder
  conditioned on z_i; decoding (z_i, x_T) with DDIM eta = 0 reconstructs the image, eta > 0
  varies it.
- interpolations: z_theta = slerp(z_1, z_2, theta); x_T either slerped too (the endpoints then
  reconstruct both inputs) or one fixed random x_T for every theta.
- text diffs: z_d = normalise(z_t - z_t0); z_theta = slerp(z_i, z_d, theta), theta from 0 to at
  most 0.5, with the image's DDIM-inverted x_T fixed.

The functions here are pure array maths; `pipelines/unclip.py` runs them through the decoder.
"""

from __future__ import annotations

import jax.numpy as jnp


def _flat(x):
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x[None]


def slerp(a, b, theta, eps: float = 1e-7):
    """Spherical interpolation between a and b [B, ...] (or [...]) at theta (scalar or [B]).

    The angle is that between the whole per-example vectors, W = arccos(a.b / (|a| |b|)) (not per
    element, unlike diffusers' community pipeline); the weights sin((1-theta) W) / sin W and
    sin(theta W) / sin W keep unit norms unit and return a and b exactly at theta 0 and 1. Nearly
    parallel vectors fall back to linear interpolation.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {a.shape} and {b.shape}")
    single = a.ndim == 1
    fa, fb = _flat(a), _flat(b)
    theta = jnp.broadcast_to(jnp.asarray(theta, jnp.float32), (fa.shape[0],))[:, None]
    na = jnp.linalg.norm(fa, axis=-1, keepdims=True)
    nb = jnp.linalg.norm(fb, axis=-1, keepdims=True)
    cos = jnp.clip(jnp.sum(fa * fb, -1, keepdims=True) / jnp.maximum(na * nb, eps), -1.0, 1.0)
    omega = jnp.arccos(cos)
    sin = jnp.sin(omega)
    parallel = sin < 1e-4
    safe = jnp.where(parallel, 1.0, sin)
    wa = jnp.where(parallel, 1.0 - theta, jnp.sin((1.0 - theta) * omega) / safe)
    wb = jnp.where(parallel, theta, jnp.sin(theta * omega) / safe)
    out = (wa * fa + wb * fb).reshape(a.shape if not single else (1,) + a.shape)
    return out[0] if single else out


def normalize(z, eps: float = 1e-12):
    """z / |z| along the last axis."""
    z = jnp.asarray(z, jnp.float32)
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)


def text_diff_direction(text_emb, base_text_emb):
    """z_d = normalise(z_t - z_t0): the direction from a base caption's embedding to a target's.

    Pass zeros as `base_text_emb` for the paper's "nothing" choice of z_t0.
    """
    return normalize(jnp.asarray(text_emb) - jnp.asarray(base_text_emb))


def text_diff_path(image_emb, direction, thetas, *, image_norm: bool = True):
    """Embeddings [N, D] along slerp(normalise(z_i), z_d, theta) for the N thetas.

    Both ends are unit vectors, so every point is; `image_norm` rescales the path to |z_i| (the
    decoder was trained on raw, unnormalised embeddings when it is Karlo's).
    """
    image_emb = jnp.asarray(image_emb, jnp.float32)
    thetas = jnp.asarray(thetas, jnp.float32)
    if image_emb.ndim != 1 or jnp.ndim(direction) != 1:
        raise ValueError("text_diff_path takes one image embedding [D] and one direction [D]")
    if thetas.ndim != 1 or float(thetas.max()) > 1.0 or float(thetas.min()) < 0.0:
        raise ValueError(f"thetas must be a 1-D array in [0, 1], got {thetas}")
    n = thetas.shape[0]
    start = jnp.broadcast_to(normalize(image_emb), (n,) + image_emb.shape)
    end = jnp.broadcast_to(normalize(direction), (n,) + image_emb.shape)
    path = slerp(start, end, thetas)
    return path * jnp.linalg.norm(image_emb) if image_norm else path


def interpolation_path(a, b, thetas):
    """slerp(a, b, theta) for each theta: a and b [...] -> [N, ...]."""
    a = jnp.asarray(a, jnp.float32)
    thetas = jnp.asarray(thetas, jnp.float32)
    n = thetas.shape[0]
    return slerp(jnp.broadcast_to(a, (n,) + a.shape), jnp.broadcast_to(b, (n,) + a.shape), thetas)
