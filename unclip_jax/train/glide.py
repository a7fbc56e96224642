"""GLIDE's training loss (SPEC 1.3, 2.2-2.5): the hybrid loss on text-conditional UNets.

- Captions are replaced by the empty sequence (all padding, mask all False) with probability
  `caption_drop` (0.2 in GLIDE), which trains the null condition of classifier-free guidance.
- Inpainting models see [x_t, image * mask, mask] with a random mask per example (recipe below);
  the loss covers the whole image, as for the base model.
- Training images larger than the model are randomly cropped to its size; upsamplers see the
  area-downsampled crop as their low-resolution input (guided-diffusion's SR recipe).

The inpainting mask recipe (the paper only says "random regions of training examples are erased",
SPEC 7.10): 10% of examples have everything erased (plain generation), 45% one axis-aligned
rectangle with each side uniform in [0.2, 0.7] of the image, 45% free-form strokes: 1 to 4 line
segments with random end points and widths uniform in [0.04, 0.12] of the image. Masks are 1 on
known pixels. Everything here is jittable and runs on device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unclip_jax import diffusion
from unclip_jax.imaging import area_downsample, random_crop
from unclip_jax.models.glide import GlideUNet


def drop_captions(rng, tokens, mask, rate: float, pad_id: int):
    """Replace whole captions by the empty sequence with probability `rate`: (tokens, mask)."""
    drop = jax.random.bernoulli(rng, rate, (tokens.shape[0], 1))
    return jnp.where(drop, pad_id, tokens), jnp.where(drop, False, mask)


def _rectangles(rng, batch: int, size: int):
    k1, k2 = jax.random.split(rng)
    extent = jax.random.uniform(k1, (batch, 2), minval=0.2, maxval=0.7)
    start = jax.random.uniform(k2, (batch, 2)) * (1.0 - extent)
    coords = (jnp.arange(size) + 0.5) / size
    inside_y = (coords[None] >= start[:, :1]) & (coords[None] < start[:, :1] + extent[:, :1])
    inside_x = (coords[None] >= start[:, 1:]) & (coords[None] < start[:, 1:] + extent[:, 1:])
    return inside_y[:, :, None] & inside_x[:, None, :]  # [B, H, W] erased


def _strokes(rng, batch: int, size: int, max_strokes: int = 4):
    k1, k2, k3, k4 = jax.random.split(rng, 4)
    p0 = jax.random.uniform(k1, (batch, max_strokes, 2))
    p1 = jax.random.uniform(k2, (batch, max_strokes, 2))
    width = jax.random.uniform(k3, (batch, max_strokes), minval=0.04, maxval=0.12)
    count = jax.random.randint(k4, (batch, 1), 1, max_strokes + 1)
    active = jnp.arange(max_strokes)[None] < count
    coords = (jnp.arange(size) + 0.5) / size
    grid = jnp.stack(jnp.meshgrid(coords, coords, indexing="ij"), -1)  # [H, W, 2] (y, x)
    # Distance from every pixel to every segment: [B, S, H, W].
    d = (p1 - p0)[:, :, None, None]
    rel = grid[None, None] - p0[:, :, None, None]
    along = jnp.clip((rel * d).sum(-1) / jnp.maximum((d * d).sum(-1), 1e-8), 0.0, 1.0)
    dist = jnp.linalg.norm(rel - along[..., None] * d, axis=-1)
    hit = (dist < width[:, :, None, None] / 2) & active[:, :, None, None]
    return hit.any(axis=1)


def random_inpaint_masks(rng, batch: int, size: int):
    """Known-pixel masks [B, size, size, 1] (1 = known) following the recipe in the docstring."""
    k_kind, k_rect, k_stroke = jax.random.split(rng, 3)
    kind = jax.random.uniform(k_kind, (batch, 1, 1))
    erased = jnp.where(
        kind < 0.1,
        True,
        jnp.where(kind < 0.55, _rectangles(k_rect, batch, size), _strokes(k_stroke, batch, size)),
    )
    return (~erased).astype(jnp.float32)[..., None]


def glide_loss(
    params,
    batch: dict,
    rng,
    *,
    model: GlideUNet,
    table: diffusion.DiffusionTable,
    caption_drop: float = 0.2,
    pad_id: int,
    low_res_size: int | None = None,
    train: bool = True,
):
    """Mean hybrid loss over the batch and its per-term metrics.

    batch: image [B, H, W, 3] in [-1, 1], tokens [B, L] int, mask [B, L] bool.
    Returns (loss, metrics) with metrics {"loss", "mse", "vb", "nonfinite"} (means over the batch).
    """
    image, tokens, mask = batch["image"], batch["tokens"], batch["mask"]
    k_drop, k_t, k_noise, k_mask, k_dropout, k_crop = jax.random.split(rng, 6)
    if image.shape[1] != model.image_size or image.shape[2] != model.image_size:
        image = random_crop(k_crop, image, model.image_size)
    tokens, mask = drop_captions(k_drop, tokens, mask, caption_drop, pad_id)
    extras = {}
    if "inpaint" in model.mode:
        extras["inpaint_image"] = image
        extras["inpaint_mask"] = random_inpaint_masks(k_mask, image.shape[0], image.shape[1])
    if "upsample" in model.mode:
        if low_res_size is None:
            raise ValueError("an upsampler's loss needs low_res_size")
        extras["low_res"] = area_downsample(image, low_res_size)

    def model_fn(x_t, t_model):
        return model.apply({"params": params}, x_t, t_model, tokens, mask, train=train,
                           rngs={"dropout": k_dropout}, **extras)  # fmt: skip

    t = diffusion.sample_timesteps(k_t, image.shape[0], table)
    noise = jax.random.normal(k_noise, image.shape, jnp.float32)
    terms = diffusion.training_losses(table, model_fn, image, t, noise)
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    return metrics["loss"], metrics
