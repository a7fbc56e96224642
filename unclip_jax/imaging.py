"""Small image operations shared by training, data and pipelines. Images are [B, H, W, C]."""

from __future__ import annotations

import jax
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


def random_crop(rng, images, size: int):
    """An independent random size x size crop of each image: [B, H, W, C] -> [B, size, size, C]."""
    b, h, w, c = images.shape
    if size > h or size > w:
        raise ValueError(f"cannot crop {size}x{size} from images of {(h, w)}")
    ky, kx = jax.random.split(rng)
    ys = jax.random.randint(ky, (b,), 0, h - size + 1)
    xs = jax.random.randint(kx, (b,), 0, w - size + 1)

    def crop(image, y, x):
        return jax.lax.dynamic_slice(image, (y, x, 0), (size, size, c))

    return jax.vmap(crop)(images, ys, xs)
