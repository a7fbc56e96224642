"""Transforms: shapes, value ranges and statistics of resizing, crops and degradations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.data import transforms


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def test_resize_center_crop():
    out = transforms.resize_center_crop(_image(300, 200), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # A flat image stays flat; a left/right split stays split at the centre.
    flat = np.full((90, 150, 3), 77, np.uint8)
    assert np.all(transforms.resize_center_crop(flat, 32) == 77)
    halves = np.zeros((100, 100, 3), np.uint8)
    halves[:, 50:] = 255
    out = transforms.resize_center_crop(halves, 20)
    assert np.all(out[:, :9] == 0) and np.all(out[:, 11:] == 255)
    img = _image(16, 16)
    assert transforms.resize_center_crop(img, 16) is img  # already the right size
    with pytest.raises(ValueError, match="positive"):
        transforms.resize_center_crop(img, 0)


def test_crops():
    assert transforms.crop_size(256) == 64 and transforms.crop_size(1024, 0.25) == 256
    with pytest.raises(ValueError, match="no crop"):
        transforms.crop_size(64, 0.0)
    img = _image(32, 40)
    crop = transforms.random_crop_np(np.random.default_rng(0), img, 8)
    assert crop.shape == (8, 8, 3)
    # The crop is a window of the image.
    hits = [
        (y, x)
        for y in range(25)
        for x in range(33)
        if np.array_equal(img[y : y + 8, x : x + 8], crop)
    ]
    assert len(hits) == 1
    with pytest.raises(ValueError, match="cannot crop"):
        transforms.random_crop_np(np.random.default_rng(0), img, 33)
    batch = jnp.asarray(np.stack([img, img]), jnp.float32)
    assert transforms.random_crop(jax.random.key(0), batch, 16).shape == (2, 16, 16, 3)


def test_gaussian_blur():
    k = transforms.gaussian_kernel(3, 0.6)
    assert k.shape == (3, 3) and abs(float(k.sum()) - 1) < 1e-6
    np.testing.assert_allclose(k, k.T)
    np.testing.assert_allclose(k, k[::-1])
    assert float(k[1, 1]) == pytest.approx(float(k.max()))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    y = jax.jit(transforms.gaussian_blur)(x)
    assert y.shape == x.shape
    assert float(y.std()) < float(x.std())  # blur removes high frequencies
    flat = jnp.full((1, 8, 8, 3), 0.3)
    np.testing.assert_allclose(transforms.gaussian_blur(flat), flat, atol=1e-6)
    # An impulse spreads into the kernel, channels independent.
    impulse = jnp.zeros((1, 7, 7, 2)).at[0, 3, 3, 0].set(1.0)
    out = transforms.gaussian_blur(impulse)
    np.testing.assert_allclose(out[0, 2:5, 2:5, 0], k, atol=1e-6)
    assert float(jnp.abs(out[..., 1]).max()) == 0
    low = jax.jit(transforms.blur_degrade, static_argnums=1)(x, 4)
    assert low.shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="odd"):
        transforms.gaussian_kernel(4, 0.6)


def test_jpeg_and_bsr():
    smooth = np.broadcast_to(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (64, 64, 3))
    smooth = np.ascontiguousarray(smooth)
    jpg = transforms.jpeg_compress(smooth, 90)
    assert jpg.shape == smooth.shape and np.abs(jpg.astype(int) - smooth).mean() < 3
    with pytest.raises(ValueError, match="quality"):
        transforms.jpeg_compress(smooth, 0)
    img = _image(64, 64)
    outs = [transforms.bsr_degrade(np.random.default_rng(s), img, 16) for s in range(6)]
    assert all(o.shape == (16, 16, 3) and o.dtype == np.uint8 for o in outs)
    # Deterministic given the rng, and different rngs give different degradations.
    np.testing.assert_array_equal(
        outs[0], transforms.bsr_degrade(np.random.default_rng(0), img, 16)
    )
    assert len({o.tobytes() for o in outs}) == len(outs)
    # The degraded image still resembles the area-downsampled original on a smooth image.
    ref = smooth.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    err = np.mean(
        [
            np.abs(transforms.bsr_degrade(np.random.default_rng(s), smooth, 16) - ref).mean()
            for s in range(4)
        ]
    )
    assert err < 25
    with pytest.raises(ValueError, match="cannot degrade"):
        transforms.bsr_degrade(np.random.default_rng(0), img, 128)


def test_to_float_and_decode():
    x = np.array([[[0, 128, 255]]], np.uint8)
    np.testing.assert_allclose(transforms.to_float(x), [[[-1, 128 / 127.5 - 1, 1]]], atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        transforms.to_float(x.astype(np.float32))
    gray = np.zeros((4, 5), np.uint8)
    assert transforms.decode_image(gray).shape == (4, 5, 3)
