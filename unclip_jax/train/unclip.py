"""unCLIP's decoder and upsampler losses (SPEC 1.3, 3.4, 3.5, 7.1, 7.12).

Decoder: the hybrid loss (MSE on eps + the VB term training the learned-range variance). For
classifier-free guidance, independently per example, the CLIP image embedding is replaced by the
learned null embedding with probability `image_drop` (paper 10%, Karlo 10%) and the caption by the
empty one with probability `caption_drop` (paper 50%, Karlo 30%):
  - "glide" pathway: tokens all padding, mask all False (as GLIDE);
  - "clip" pathway: the CLIP features of the empty prompt (`null_text`, unbatched; see
    models.decoder.null_cond). Without `null_text`, zero features with every text token masked
    out (only the 4 image tokens are attended), which is a null condition of its own: then sample
    with the same zeros.

Upsamplers: eps MSE (fixed small variance, as Karlo) on random crops of `crop_fraction` of the
target SIDE (SPEC 7.12: 64 px crops at 256, 256 px at 1024), the model being convolutional. The
conditioning is made from the crop:
  - "blur" (stage 1): area-downsampled by image_size / low_res_size, then Gaussian blur k 3,
    sigma 0.6 (transforms.blur_degrade), on device;
  - "none": area-downsampled only;
  - "given" (stage 2, BSR): the batch already holds the crop and its degraded "low_res", made on
    the host by `bsr_pairs_np` (BSR's JPEG and PIL resampling have no XLA counterpart).
The model resizes low_res back to the crop's size itself (bicubic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import diffusion
from unclip_jax.data import transforms
from unclip_jax.imaging import area_downsample, random_crop
from unclip_jax.models.decoder import UnclipDecoder, UnclipUpsampler
from unclip_jax.train.glide import drop_captions

DEGRADATIONS = ("blur", "none", "given")
_DECODER_KEYS = ("image_emb", "tokens", "mask", "text_emb", "text_tokens", "text_mask")


def drop_clip_text(rng, cond: dict, rate: float, null_text: dict | None = None) -> dict:
    """Replace the "clip" pathway's text features by the empty prompt's with probability `rate`.

    null_text: {"text_emb" [D], "text_tokens" [L, Dt], "text_mask" [L]} (CLIP of ""); None means
    zero features with no text token attended.
    """
    b = cond["text_emb"].shape[0]
    drop = jax.random.bernoulli(rng, rate, (b,))
    out = dict(cond)
    for key in ("text_emb", "text_tokens", "text_mask"):
        value = cond[key]
        null = jnp.zeros(value.shape[1:], value.dtype) if null_text is None else null_text[key]
        null = jnp.broadcast_to(jnp.asarray(null, value.dtype)[None], value.shape)
        out[key] = jnp.where(drop.reshape((b,) + (1,) * (value.ndim - 1)), null, value)
    return out


def decoder_loss(
    params,
    batch: dict,
    rng,
    *,
    model: UnclipDecoder,
    table: diffusion.DiffusionTable,
    image_drop: float = 0.1,
    caption_drop: float = 0.5,
    pad_id: int | None = None,
    null_text: dict | None = None,
    train: bool = True,
):
    """Mean hybrid loss of the decoder and its per-term metrics.

    batch: image [B, H, W, 3] in [-1, 1] (randomly cropped to the model's size if larger),
    image_emb [B, clip_dim], and the text pathway's keys ("glide": tokens, mask; "clip": text_emb,
    text_tokens, text_mask). Returns (loss, {"loss", "mse", "vb", "nonfinite"}).
    """
    image = batch["image"]
    k_img, k_txt, k_t, k_noise, k_dropout, k_crop = jax.random.split(rng, 6)
    if image.shape[1] != model.image_size or image.shape[2] != model.image_size:
        image = random_crop(k_crop, image, model.image_size)
    cond = {k: batch[k] for k in _DECODER_KEYS if k in batch}
    b = image.shape[0]
    cond["drop_image"] = jax.random.bernoulli(k_img, image_drop, (b,))
    if model.pathway == "glide":
        if pad_id is None:
            raise ValueError("the glide text pathway's caption drop needs pad_id")
        cond["tokens"], cond["mask"] = drop_captions(k_txt, cond["tokens"], cond["mask"],
                                                     caption_drop, pad_id)  # fmt: skip
    else:
        cond = drop_clip_text(k_txt, cond, caption_drop, null_text)

    def model_fn(x_t, t_model):
        return model.apply({"params": params}, x_t, t_model, cond, train=train,
                           rngs={"dropout": k_dropout})  # fmt: skip

    t = diffusion.sample_timesteps(k_t, b, table)
    noise = jax.random.normal(k_noise, image.shape, jnp.float32)
    terms = diffusion.training_losses(table, model_fn, image, t, noise)
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    return metrics["loss"], metrics


def upsampler_pair(rng, image, *, model: UnclipUpsampler, crop_fraction: float = 0.25,
                   degradation: str = "blur"):  # fmt: skip
    """(crop [B, c, c, 3], low_res [B, c/s, c/s, 3]) on device; s = image_size / low_res_size."""
    scale = model.image_size // model.low_res_size
    crop = transforms.crop_size(model.image_size, crop_fraction)
    if crop % scale:
        raise ValueError(f"crops of {crop} px do not downsample by {scale}")
    if image.shape[1] != crop or image.shape[2] != crop:
        image = random_crop(rng, image, crop)
    return image, degrade(image, crop // scale, degradation)


def degrade(image, low_res_size: int, degradation: str):
    """The on-device conditioning of an upsampler: area-downsampled, then blurred ("blur")."""
    if degradation == "blur":
        return transforms.blur_degrade(image, low_res_size)
    if degradation == "none":
        return area_downsample(image, low_res_size)
    raise ValueError(f"on-device degradation must be 'blur' or 'none', got {degradation!r}")


def upsampler_loss(
    params,
    batch: dict,
    rng,
    *,
    model: UnclipUpsampler,
    table: diffusion.DiffusionTable,
    crop_fraction: float = 0.25,
    degradation: str = "blur",
    train: bool = True,
):
    """Mean loss of an upsampler (MSE on eps; + VB if its variance is learned) and its metrics.

    batch: image [B, H, W, 3] in [-1, 1]; with degradation "given" also low_res (the image is then
    used as it is, already cropped). Returns (loss, {"loss", "mse", "nonfinite"}).
    """
    if degradation not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {degradation!r}; expected one of {DEGRADATIONS}")
    k_crop, k_t, k_noise, k_dropout = jax.random.split(rng, 4)
    if degradation == "given":
        image, low_res = batch["image"], batch["low_res"]
    else:
        image, low_res = upsampler_pair(k_crop, batch["image"], model=model,
                                        crop_fraction=crop_fraction,
                                        degradation=degradation)  # fmt: skip
    cond = {"low_res": low_res}

    def model_fn(x_t, t_model):
        return model.apply({"params": params}, x_t, t_model, cond, train=train,
                           rngs={"dropout": k_dropout})  # fmt: skip

    t = diffusion.sample_timesteps(k_t, image.shape[0], table)
    noise = jax.random.normal(k_noise, image.shape, jnp.float32)
    terms = diffusion.training_losses(table, model_fn, image, t, noise)
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    return metrics["loss"], metrics


def bsr_pairs_np(rng: np.random.Generator, images: np.ndarray, crop: int, scale: int) -> dict:
    """Host side of the BSR-conditioned upsampler: random crops and their BSR degradations.

    images: [B, H, W, 3] uint8. Returns {"image": [B, crop, crop, 3], "low_res": [B, crop / scale,
    crop / scale, 3]}, float32 in [-1, 1], for upsampler_loss(..., degradation="given").
    """
    if crop % scale:
        raise ValueError(f"crops of {crop} px do not downsample by {scale}")
    crops = [transforms.random_crop_np(rng, image, crop) for image in images]
    lows = [transforms.bsr_degrade(rng, c, crop // scale) for c in crops]
    return {"image": transforms.to_float(np.stack(crops)),
            "low_res": transforms.to_float(np.stack(lows))}  # fmt: skip


def loss_fn_from_config(config, model, *, null_text: dict | None = None):
    """`loss_fn(params, batch, rng)` for a decoder64 / upsample* config (config.kind)."""
    import functools

    table = diffusion.diffusion_from_config(config.diffusion)
    if config.kind == "decoder":
        pad_id = config.model.text.pad_id if config.model.text_pathway == "glide" else None
        return functools.partial(decoder_loss, model=model, table=table,
                                 image_drop=config.train.image_drop,
                                 caption_drop=config.train.caption_drop, pad_id=pad_id,
                                 null_text=null_text)  # fmt: skip
    if config.kind == "upsampler":
        return functools.partial(upsampler_loss, model=model, table=table,
                                 crop_fraction=config.train.crop_fraction,
                                 degradation=config.train.degradation)  # fmt: skip
    raise ValueError(f"config.kind {config.kind!r} is neither 'decoder' nor 'upsampler'")
