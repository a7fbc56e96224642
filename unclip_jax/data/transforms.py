"""Image transforms for training: resizing, crops and the upsamplers' conditioning degradations.

Where each runs:
- host (NumPy/PIL, inside the grain loader, per example [H, W, 3] uint8): `decode_image`,
  `resize_center_crop`, `random_crop_np`, `to_float`, `jpeg_compress`, `bsr_degrade`. JPEG and PIL's
  resampling have no XLA counterpart, so the second-stage degradation is host-only.
- jittable (jax.numpy, on batches [B, H, W, C] in [-1, 1]): `gaussian_kernel`, `gaussian_blur`,
  `blur_degrade` (unCLIP's first-stage conditioning), `random_crop` (from `unclip_jax.imaging`).

unCLIP (Ramesh et al. 2022, appendix): the 64 -> 256 upsampler sees its low-resolution input blurred
with a Gaussian (k = 3, sigma = 0.6); the 256 -> 1024 one sees a BSR degradation (Zhang et al.
2021: random blur, resizing, noise and JPEG); both train on random crops of a quarter of the target
size, since they are convolutional and attention-free.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unclip_jax.imaging import area_downsample, random_crop

__all__ = [
    "area_downsample",
    "blur_degrade",
    "bsr_degrade",
    "crop_size",
    "decode_image",
    "gaussian_blur",
    "gaussian_kernel",
    "jpeg_compress",
    "random_crop",
    "random_crop_np",
    "resize_center_crop",
    "to_float",
]

# ---- host (NumPy / PIL) ----


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded bytes (any format PIL reads) or an array -> [H, W, 3] uint8 RGB (host)."""
    if isinstance(data, np.ndarray):
        image = data
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
            raise ValueError(
                f"expected an [H, W, 1|3|4] uint8 image, got {image.shape} {image.dtype}"
            )
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        return np.ascontiguousarray(image[..., :3])
    with Image.open(io.BytesIO(data)) as pil:
        return np.asarray(pil.convert("RGB"))


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [size, size, 3] uint8: shorter side to `size`, then the centre (host).

    As guided-diffusion's `center_crop_arr`: halve with a box filter while the shorter side is at
    least twice the target (cheap, alias-free), then one bicubic resize, then crop the centre.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(max(size, round(x * scale)) for x in pil.size), Image.Resampling.BICUBIC)
    array = np.asarray(pil)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def crop_size(target_size: int, fraction: float = 0.25) -> int:
    """Side of the training crops: `fraction` of the model's size (unCLIP's upsamplers: 1/4)."""
    size = round(target_size * fraction)
    if not 0 < fraction <= 1 or size < 1:
        raise ValueError(f"crop fraction {fraction} of {target_size} gives no crop")
    return size


def random_crop_np(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """A uniformly placed size x size crop of [H, W, C] (host; `random_crop` is the jit version)."""
    h, w = image.shape[:2]
    if size > h or size > w:
        raise ValueError(f"cannot crop {size}x{size} from an image of {(h, w)}")
    top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    return image[top : top + size, left : left + size]


def to_float(image: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 -> float32 in [-1, 1] (host): 0 -> -1, 255 -> 1."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    return image.astype(np.float32) / 127.5 - 1.0


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """[H, W, 3] uint8 through a JPEG encode/decode at `quality` (1-95) with PIL (host)."""
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be in [1, 95], got {quality}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    return decode_image(buffer.getvalue())


_RESAMPLERS = (
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.BOX,
)


def _random_blur(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    # BSR's blur: an isotropic or anisotropic (rotated) Gaussian, odd size 7-21, sigma 0.1-2.8.
    k = int(rng.choice(np.arange(7, 22, 2)))
    s1, s2 = rng.uniform(0.1, 2.8, size=2)
    if rng.random() < 0.5:
        s2 = s1
    theta = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    inv_cov = np.linalg.inv(rot @ np.diag([s1**2, s2**2]) @ rot.T)
    r = np.arange(k) - k // 2
    grid = np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1).astype(np.float64)
    kernel = np.exp(-0.5 * np.einsum("...i,ij,...j->...", grid, inv_cov, grid))
    kernel /= kernel.sum()
    padded = np.pad(image.astype(np.float64), ((k // 2,) * 2, (k // 2,) * 2, (0, 0)), "reflect")
    h, w = image.shape[:2]
    out = np.zeros(image.shape, np.float64)
    for dy in range(k):  # k^2 shifted adds: cheap at the sizes the degradation runs on
        for dx in range(k):
            out += kernel[dy, dx] * padded[dy : dy + h, dx : dx + w]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _random_resize(rng: np.random.Generator, image: np.ndarray, size: tuple[int, int]):
    resample = _RESAMPLERS[rng.integers(len(_RESAMPLERS))]
    return np.asarray(Image.fromarray(image).resize(size[::-1], resample))


def _random_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    # BSR's noise: Gaussian with sigma 2-25 (of 255), per channel or shared across channels.
    sigma = rng.uniform(2, 25)
    shape = image.shape if rng.random() < 0.6 else (*image.shape[:2], 1)
    noisy = image.astype(np.float64) + rng.normal(0, sigma, shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def bsr_degrade(rng: np.random.Generator, image: np.ndarray, low_res: int) -> np.ndarray:
    """A BSR-style degradation of [H, W, 3] uint8 to [low_res, low_res, 3] uint8 (host).

    After BSRGAN's `degradation_bsrgan_variant`: two blurs, a resize and Gaussian noise in a random
    order (each skipped with probability 0.25), where the resize goes to a random size between
    `low_res` and the current shorter side; then the final resize to `low_res` and a JPEG pass at
    quality 30-95, each resize with a random interpolation (nearest, bilinear, bicubic, box).
    Square output: a non-square input is squashed, so crop it square first.
    """
    h, w = image.shape[:2]
    if low_res > min(h, w):
        raise ValueError(f"cannot degrade {(h, w)} up to {low_res}")
    out = image
    steps = ["blur", "blur", "resize", "noise"]
    for step in rng.permutation(steps):
        if rng.random() < 0.25:
            continue
        if step == "blur":
            out = _random_blur(rng, out)
        elif step == "noise":
            out = _random_noise(rng, out)
        else:
            mid = int(rng.integers(low_res, max(low_res, min(out.shape[:2])) + 1))
            out = _random_resize(rng, out, (mid, mid))
    out = _random_resize(rng, out, (low_res, low_res))
    return jpeg_compress(out, int(rng.integers(30, 96)))


# ---- jittable (jax.numpy) ----


def gaussian_kernel(size: int = 3, sigma: float = 0.6) -> jax.Array:
    """[size, size] float32 normalised Gaussian (sums to 1); size odd."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    r = np.arange(size) - size // 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return jnp.asarray(k / k.sum(), jnp.float32)


def gaussian_blur(images: jax.Array, size: int = 3, sigma: float = 0.6) -> jax.Array:
    """Depthwise Gaussian blur of [B, H, W, C] with reflect padding (so a flat image stays flat).

    Jittable; `size` and `sigma` are Python numbers (the kernel is a constant).
    """
    c = images.shape[-1]
    kernel = jnp.tile(gaussian_kernel(size, sigma)[:, :, None, None], (1, 1, 1, c))
    p = size // 2
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    out = jax.lax.conv_general_dilated(
        padded.astype(jnp.float32),
        kernel,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )
    return out.astype(images.dtype)


def blur_degrade(images: jax.Array, low_res: int) -> jax.Array:
    """unCLIP's first-stage conditioning: [B, H, W, C] -> area-downsampled to low_res, then blurred
    (k = 3, sigma = 0.6). Jittable; the upsampler bilinearly upsamples it again inside the model.
    """
    return gaussian_blur(area_downsample(images, low_res), 3, 0.6)
