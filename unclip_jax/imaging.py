"""Small image operations shared by training, data and pipelines. Images are [B, H, W, C]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 NumPy (the 8-bit levels of quantize_8bit)."""
    images = np.asarray(images, np.float32)
    if images.ndim not in (3, 4) or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [B, H, W, 1 or 3] or [H, W, C], got {images.shape}")
    return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def make_grid(images, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """[B, H, W, C] (or [B, H, W]) in [-1, 1] -> one uint8 RGB grid image, `ncol` columns
    (default ceil(sqrt(B))) and `pad` white pixels between tiles."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.ndim != 4:
        raise ValueError(f"expected images [B, H, W, C], got {images.shape}")
    images = to_uint8(images)
    b, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(b)))
    nrow = int(np.ceil(b / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def save_png(image: np.ndarray, path) -> None:
    """Write one uint8 [H, W, C] array (or a [-1, 1] float one) as a PNG, creating folders;
    `path` may be local or gs://... (written whole, atomically: `storage.write_bytes`)."""
    import io

    from PIL import Image

    from unclip_jax import storage

    if image.dtype != np.uint8:
        image = to_uint8(image)
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())


def load_image(path, size: int | None = None) -> np.ndarray:
    """An RGB image file -> float32 [H, W, 3] in [-1, 1], optionally resized (bicubic) to size."""
    from PIL import Image, UnidentifiedImageError

    from unclip_jax import storage

    try:
        with storage.path(path).open("rb") as f, Image.open(f) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            array = np.asarray(im, np.float32)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return array / 127.5 - 1.0
