"""The unCLIP kinds' sample grids (`train.sample_every`, from the EMA params; `hooks.write_samples`
writes them on process 0). What each grid shows, one row per held-out example:

    clip       its caption's own image, then the caption's top-k pool images by CLIP similarity
    prior,     its caption's own image, then the pool images nearest (cosine) to an image
    ar_prior   embedding sampled for the caption
    decoder    the original | the decoding of its CLIP image embedding (and caption)
    upsampler  the degraded low-res input (nearest-upscaled) | the sample | the ground truth

The retrieval kinds (clip, prior, ar_prior) search a pool of `POOL` held-out examples, run every
caption of the pool and log to sample_metrics.jsonl: `sample_top1`, the fraction of captions whose
nearest image carries the same caption (shapes captions repeat, so this is not "the same
example"), and for the priors `sample_cosine`, the mean cosine of each sampled embedding with its
caption's own image embedding, beside `text_cosine`, the same for the caption's CLIP text
embedding (what a prior must beat: unCLIP's prior exists because z_t is a poor stand-in for z_i).

Held-out examples come from the `validation` split: of the source, or of the side dataset when it
has one (else its training split, with a warning). A hook reads them on its first call, then runs
one jitted function per call whose arguments are the params, the rng and the examples, so it
compiles once per run; the host only assembles the grid afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.clip import l2_normalize
from unclip_jax.train.hooks import SampleGrid, to_host

log = logging.getLogger(__name__)

HELD_OUT = "validation"
ROWS = 4  # examples shown per grid
TOP_K = 3  # retrieved images per row
POOL = 64  # held-out examples searched by the retrieval grids
DISPLAY = 64  # tile size of the retrieval grids (shapes' native size)


# ------------------------------------------------------------------------------ held-out examples
def _caption(record) -> str:
    caption = record["caption"]
    return caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)


def _first(source, count: int) -> list[dict]:
    return [source[i] for i in range(min(count, len(source)))]


def _images(records, size: int) -> np.ndarray:
    """The records' images as [N, size, size, 3] float32 in [-1, 1] (resized and centre-cropped
    on the host when they are not size x size, as `data embed` does)."""
    from unclip_jax.data.embeddings import clip_images

    return clip_images(records, size)


def _caption_ids(records) -> np.ndarray:
    """[N] int32: equal captions get equal ids."""
    ids: dict[str, int] = {}
    return np.asarray([ids.setdefault(_caption(r), len(ids)) for r in records], np.int32)


def held_out_embeddings(folder, train_split: str, source, count: int) -> list[dict]:
    """The first `count` side-dataset records of the held-out split (else `train_split`), each
    joined with its source image; `source(split)` opens the source's data source."""
    from unclip_jax.data.embeddings import JoinedSource, embedding_source

    split = HELD_OUT
    try:
        side = embedding_source(folder, split)
    except ValueError:
        log.warning("%s has no %r split: the sample grids show %r examples", folder, split,
                    train_split)  # fmt: skip
        split = train_split
        side = embedding_source(folder, split)
    return _first(JoinedSource(side, source(split)), count)


def _text_arrays(records, text_ctx: int | None = None) -> dict:
    """CLIP's text outputs of side-dataset records, the per-token ones padded to text_ctx."""

    def stack(key, dtype):
        return np.stack([np.asarray(r[key]) for r in records]).astype(dtype)

    out = {"text_emb": stack("text_emb", np.float32),
           "text_tokens": stack("text_tokens", np.float32),
           "text_mask": stack("mask", bool), "tokens": stack("tokens", np.int32)}  # fmt: skip
    if text_ctx is not None:
        from unclip_jax.train.unclip_kinds import pad_to

        for key in ("text_tokens", "text_mask", "tokens"):
            out[key] = pad_to(out[key], text_ctx)
    return out


# ------------------------------------------------------------------------------ retrieval
def retrieve(queries, pool, caption_ids):
    """Top-k pool indices [Q, k] by cosine of queries [Q, D] with pool [P, D] (k = min(TOP_K, P)),
    and the fraction of queries whose top-1 carries their caption (query i is pool example i)."""
    similarity = l2_normalize(queries) @ l2_normalize(pool).T
    _, top = jax.lax.top_k(similarity, min(TOP_K, pool.shape[0]))
    same = caption_ids[top[:, 0]] == caption_ids[: queries.shape[0]]
    return top, jnp.mean(same.astype(jnp.float32))


def retrieval_grid(display: np.ndarray, top, scalars: dict) -> SampleGrid:
    """Rows of [the query's own image, its top-k pool images]; display [P, S, S, 3]."""
    top = to_host(top)[:ROWS]
    tiles = np.concatenate([np.concatenate([display[i : i + 1], display[row]])
                            for i, row in enumerate(top)])  # fmt: skip
    return SampleGrid(tiles, ncol=1 + top.shape[1], scalars=scalars)


def clip_sample(config, model, tokenizer, source):
    """The clip kind's hook: the pool's captions retrieve among the pool's images."""
    from unclip_jax.models.clip import preprocess_images

    size = model.vision.image_size

    @functools.cache
    def examples():
        records = _first(source(HELD_OUT), POOL)
        tokens = tokenizer([_caption(r) for r in records])
        inputs = {"images": _images(records, size), "input_ids": tokens.input_ids,
                  "eot_positions": tokens.eot_positions,
                  "caption_ids": _caption_ids(records)}  # fmt: skip
        return inputs, _images(records, DISPLAY)

    noised = model.vision.num_timesteps is not None  # read at t = 0: clean images

    @jax.jit
    def run(params, inputs):
        images = inputs["images"]
        # A [-1, 1]-input tower (the noise-aware one) normalises inside; CLIP's takes pixels.
        pixels = images if model.vision.normalize_input else preprocess_images(images, size)
        t = jnp.zeros((images.shape[0],), jnp.int32) if noised else None
        out = model.apply({"params": params}, inputs["input_ids"], pixels, timesteps=t,
                          eot_positions=inputs["eot_positions"])  # fmt: skip
        top, top1 = retrieve(out.text_embeds, out.image_embeds, inputs["caption_ids"])
        return top, {"sample_top1": top1}

    def sample(ema_params, rng):
        del rng  # deterministic
        inputs, display = examples()
        return retrieval_grid(display, *run(ema_params, inputs))

    return sample


def _prior_hook(config, folder, source, text_ctx: int, embed, extra=None):
    """A retrieval grid of sampled embeddings: embed(params, rng, inputs) -> [P, D] raw CLIP
    image embeddings for the pool's captions; `extra` (arrays) joins the jitted inputs."""

    @functools.cache
    def examples():
        records = held_out_embeddings(folder, config.data.split, source, POOL)
        inputs = _text_arrays(records, text_ctx)
        inputs["image_emb"] = np.stack([r["image_emb"] for r in records]).astype(np.float32)
        inputs["caption_ids"] = _caption_ids(records)
        return inputs, _images(records, DISPLAY)

    @jax.jit
    def run(params, rng, inputs):
        z = embed(params, rng, inputs)
        top, top1 = retrieve(z, inputs["image_emb"], inputs["caption_ids"])
        image = l2_normalize(inputs["image_emb"])
        cosine = jnp.sum(l2_normalize(z) * image, axis=-1)
        # The baseline a prior must beat (the unCLIP paper's case for one): the caption's CLIP
        # text embedding used as the image embedding, which CLIP's modality gap keeps apart.
        text = jnp.sum(l2_normalize(inputs["text_emb"]) * image, axis=-1)
        return top, {"sample_top1": top1, "sample_cosine": jnp.mean(cosine),
                     "text_cosine": jnp.mean(text)}  # fmt: skip

    def sample(ema_params, rng):
        inputs, display = examples()
        return retrieval_grid(display, *run(ema_params, rng, {**inputs, **(extra or {})}))

    return sample


def prior_sample(config, model, folder, source, null_text=None):
    """The diffusion prior's hook (PriorSampler: train.sample_respacing, the config's sampler,
    candidates, clamp and guidance; `null_text` for a prior without a learned null)."""
    from unclip_jax.pipelines.prior import PriorSampler, conditioning, null_conditioning

    s = config.sample
    sampler = PriorSampler(model, config.diffusion, respacing=config.train.sample_respacing,
                           sampler=s.sampler, num_candidates=s.num_candidates,
                           clamp=s.get("clamp"))  # fmt: skip
    scale = float(s.guidance_scale)

    def embed(params, rng, inputs):
        cond = conditioning(model, inputs["text_emb"], inputs["text_tokens"], inputs["text_mask"])
        if scale == 1.0:  # unguided: no null half
            return sampler(params, cond, rng)["image_emb"]
        null = null_conditioning(model, cond, null_text)
        return sampler(params, cond, rng, null_cond=null, guidance_scale=scale)["image_emb"]

    return _prior_hook(config, folder, source, model.text_ctx, embed)


def ar_prior_sample(config, model, codec, folder, source):
    """The AR prior's hook (ARPriorSampler with the config's guidance, temperature, top-k and
    similarity percentile)."""
    from unclip_jax.pipelines.ar_prior import ARPriorSampler

    s = config.sample
    sampler = ARPriorSampler(model)

    def embed(params, rng, inputs):
        return sampler(params, inputs["codec"], inputs["tokens"], inputs["text_mask"],
                       inputs["text_emb"], rng, guidance_scale=s.guidance_scale,
                       temperature=s.temperature, top_k=s.top_k,
                       dot_percentile=s.dot_percentile)["embeddings"]  # fmt: skip

    return _prior_hook(config, folder, source, model.text_ctx, embed, extra={"codec": codec})


# ------------------------------------------------------------------------------ image models
def _stage(config, model):
    from unclip_jax.models.decoder import make_model_fn
    from unclip_jax.pipelines.stage import DiffusionStage

    size = model.image_size
    return DiffusionStage(make_model_fn(model), None, config.diffusion, (size, size, 3))


def decoder_sample(config, model, folder, source, null_text=None, tokenizer=None):
    """The decoder's hook: held-out images' CLIP image embeddings (with their captions) decoded
    with the config's sampler and guidance at train.sample_respacing (`tokenizer`: the run's
    GLIDE tokenizer, for a "glide" text pathway)."""
    from unclip_jax.models.decoder import null_cond

    stage = _stage(config, model)
    scale = float(config.sample.guidance_scale)

    @functools.cache
    def examples():
        records = held_out_embeddings(folder, config.data.split, source, ROWS)
        cond = {"image_emb": np.stack([r["image_emb"] for r in records]).astype(np.float32),
                "drop_image": np.zeros((len(records),), bool)}  # fmt: skip
        if model.text is not None:  # the paper's GLIDE text pathway
            from unclip_jax.tokenizers import glide_tokenize

            if tokenizer is None:
                raise ValueError("a decoder with a 'glide' text pathway needs its tokenizer")
            tokens, mask = glide_tokenize(tokenizer,
                                          [_caption(r) for r in records], model.text.text_ctx,
                                          config.model.text.pad_id, warn=False)  # fmt: skip
            cond |= {"tokens": tokens, "mask": mask}
            null = null_cond(cond, pad_id=config.model.text.pad_id)
        else:
            text = _text_arrays(records)
            cond |= {k: text[k] for k in ("text_emb", "text_tokens", "text_mask")}
            null = null_cond(cond, null_text=null_text)
        return cond, null, _images(records, model.image_size)

    @jax.jit
    def run(params, rng, cond, null):
        guided = scale != 1.0
        return dataclasses.replace(stage, params=params).sample(
            cond, rng, batch=cond["image_emb"].shape[0], respacing=config.train.sample_respacing,
            sampler=config.sample.sampler, null_cond=null if guided else None,
            guidance_scale=scale if guided else None,
        )  # fmt: skip

    def sample(ema_params, rng):
        cond, null, originals = examples()
        decoded = to_host(run(ema_params, rng, cond, null))
        return SampleGrid(np.stack([originals, decoded], axis=1).reshape(-1, *decoded.shape[1:]),
                          ncol=2)  # fmt: skip

    return sample


def _low_res(config, model, images: np.ndarray) -> np.ndarray:
    """The upsampler's conditioning of full held-out images, degraded as in training."""
    from unclip_jax.data import transforms
    from unclip_jax.train.unclip import degrade

    low = model.low_res_size
    if config.train.degradation != "given":  # the training loss's own on-device degradation
        return np.asarray(degrade(jnp.asarray(images), low, config.train.degradation))
    # "given": BSR on the host, seeded so every grid of a run sees the same inputs
    rng = np.random.default_rng(config.seed)
    uint8 = np.round((images + 1) * 127.5).astype(np.uint8)
    return transforms.to_float(np.stack([transforms.bsr_degrade(rng, x, low) for x in uint8]))


def upsampler_sample(config, model, source):
    """The upsampler's hook: held-out source images at the model's size, degraded as in
    training, upsampled with the config's sampler at train.sample_respacing."""
    stage = _stage(config, model)
    size = model.image_size

    @functools.cache
    def examples():
        truth = _images(_first(source(HELD_OUT), ROWS), size)
        return truth, _low_res(config, model, truth)

    @jax.jit
    def run(params, rng, low_res):
        return dataclasses.replace(stage, params=params).sample(
            {"low_res": low_res}, rng, batch=low_res.shape[0],
            respacing=config.train.sample_respacing, sampler=config.sample.sampler,
        )  # fmt: skip

    def sample(ema_params, rng):
        truth, low = examples()
        upsampled = to_host(run(ema_params, rng, low))
        factor = size // low.shape[1]
        shown = low.repeat(factor, axis=1).repeat(factor, axis=2)  # nearest, to the tile size
        return SampleGrid(np.stack([shown, upsampled, truth], axis=1).reshape(-1, size, size, 3),
                          ncol=3)  # fmt: skip

    return sample
