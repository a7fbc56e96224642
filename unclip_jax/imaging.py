"""Small image operations shared by training, data and pipelines. Images are [B, H, W, C]."""

from __future__ import annotations

import jax.numpy as jnp


def area_downsample(images, size: int):
    """[B, H, W, C] -> [B, size, size, C] by averaging H/size x W/size blocks (torch's 'area')."""
    b, h, w, c = images.shape
    if h % size or w % size:
        raise ValueError(f"image size {(h, w)} is not a multiple of the target size {size}")
    if h == w == size:
        return images
    return images.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


def nearest_downsample(images, size: int):
    """[B, H, W, C] -> [B, size, size, C] keeping every (H/size)-th pixel (for masks)."""
    b, h, w, c = images.shape
    if h % size or w % size:
        raise ValueError(f"image size {(h, w)} is not a multiple of the target size {size}")
    return images[:, :: h // size, :: w // size]


def quantize_8bit(images):
    """Round [-1, 1] images to the 256 levels an 8-bit PNG holds (GLIDE's base -> upsampler)."""
    return jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5) / 127.5 - 1
