"""unCLIP (DALL-E 2): text -> CLIP text encoder -> prior -> decoder -> upsamplers -> images.

Each stage is one jitted sampler, composed on the host (DESIGN 7):
  1. CLIP's text tower: the text embedding z_t, per-token features and token ids of each prompt;
  2. the prior: `diffusion` (best of N by dot product with z_t), `ar` (PCA codes), or `none` (z_t
     itself stands in for the image embedding, the paper's ablation);
  3. the decoder, classifier-free guided (null = learned null image embedding + empty caption);
  4. the upsamplers on the clamped previous output (no guidance).
Guidance scales are per stage and per example ([B]), so sweeps compile once per stage.

The manipulations of SPEC 3.6 use the decoder's bipartite latent (z_i, x_T): `invert` (DDIM
inversion conditioned on the image's own CLIP embedding), `variations`, `interpolate` and
`text_diff`. The decoder's caption for them is empty, as in Karlo's image variations.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import compile_cache, storage
from unclip_jax.pipelines import manipulations
from unclip_jax.pipelines.stage import DiffusionStage, network_key, sampling_dtype

log = logging.getLogger(__name__)

PRIOR_TYPES = ("diffusion", "ar", "none")


def _text_forward(model, params, ids, eot):
    out = model.apply({"params": params}, ids, eot_positions=eot)
    return out.text_embeds.astype(jnp.float32), out.text_hidden_states.astype(jnp.float32)


def _image_forward(model, params, images):
    from unclip_jax.models.clip import preprocess_images

    pixels = preprocess_images(images, model.vision.image_size)
    return model.apply({"params": params}, images=pixels).image_embeds.astype(jnp.float32)


class ClipEncoder:
    """CLIP's two towers as the unCLIP stack reads them (the same forward as `data embed`).

    text(prompts) -> {"text_emb" [B, D] (projected EOT feature, not normalised), "text_tokens"
    [B, L, Dt] (final-LayerNorm features), "text_mask" [B, L], "tokens" [B, L]};
    images(x [B, H, W, 3] in [-1, 1]) -> image embeddings [B, D].
    """

    def __init__(self, model, params, tokenizer, *, image_model=None, image_params=None):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        # Karlo/diffusers ship the towers as separate models (text_encoder, image_encoder).
        self.image_model = model if image_model is None else image_model
        self.image_params = params if image_model is None else image_params
        image = self.image_model
        self._text = compile_cache.Exported(functools.partial(_text_forward, model),
                                            f"ClipEncoder.text/{model!r}")  # fmt: skip
        self._image = compile_cache.Exported(functools.partial(_image_forward, image),
                                             f"ClipEncoder.images/{image!r}")  # fmt: skip

    def text(self, prompts: list[str]) -> dict:
        tokens = self.tokenizer(list(prompts))
        emb, feats = self._text(self.params, tokens.input_ids, tokens.eot_positions)
        return {"text_emb": emb, "text_tokens": feats,
                "text_mask": jnp.asarray(tokens.attention_mask, bool),
                "tokens": jnp.asarray(tokens.input_ids, jnp.int32)}  # fmt: skip

    def images(self, images) -> jax.Array:
        if self.image_model.vision is None:
            raise ValueError("this CLIP has no image tower: variations and interpolations need "
                             "one (Karlo: the image_encoder folder)")  # fmt: skip
        return self._image(self.image_params, jnp.asarray(images, jnp.float32))


def _pad_text(text: dict, length: int) -> dict:
    """CLIP outputs padded (masked) to a model's text context; an error if they do not fit."""
    current = text["text_mask"].shape[1]
    if current > length:
        raise ValueError(f"CLIP's context ({current}) is longer than the model's ({length})")
    if current == length:
        return text
    pad = length - current
    return {
        "text_emb": text["text_emb"],
        "text_tokens": jnp.pad(text["text_tokens"], ((0, 0), (0, pad), (0, 0))),
        "text_mask": jnp.pad(text["text_mask"], ((0, 0), (0, pad))),
        "tokens": jnp.pad(text["tokens"], ((0, 0), (0, pad))),
    }


def make_last_step_model_fn(model) -> Callable:
    """model_fn over params {"first": ..., "last": ...}: the "last" network runs at t = 0 only.

    Karlo's 64 -> 256 upsampler samples 7 ancestral steps with one network and a second one,
    fine-tuned separately, for the final step (SPEC 4.4); a `lax.cond` on the timestep picks it
    inside the jitted loop.
    """

    def model_fn(params, x, t, cond):
        def run(which):
            return model.apply({"params": params[which]}, x, t, cond)

        return jax.lax.cond(t[0] == 0, lambda: run("last"), lambda: run("first"))

    return model_fn


def _scales(value, batch: int):
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch,))


def _guidance(null, value, batch: int):
    """(null_cond, [B] scales), or (None, None) when every scale is 1: the conditional
    prediction alone, without the null half of the 2B batch."""
    if not isinstance(value, jax.core.Tracer) and np.all(np.asarray(value) == 1.0):
        return None, None
    return null, _scales(value, batch)


@dataclass
class PriorStage:
    """The diffusion prior (`PriorSampler` + params) or the AR prior (sampler, params, codec)."""

    kind: str  # "diffusion" or "ar"
    sampler: Any
    params: Any
    model: Any
    codec: Any = None
    sample: dict = field(default_factory=dict)  # the config's sample section (defaults)


@dataclass
class UnclipPipeline:
    """The unCLIP stack. `decoder` and `upsamplers` are DiffusionStages; `decoder_model` is the
    UnclipDecoder (for its text pathway); `glide_tokenizer`/`pad_id` serve a "glide" pathway."""

    clip: ClipEncoder
    decoder: DiffusionStage
    decoder_model: Any
    priors: dict = field(default_factory=dict)  # "diffusion" / "ar" -> PriorStage
    upsamplers: list = field(default_factory=list)  # [(DiffusionStage, sample section)]
    decoder_sample: dict = field(default_factory=dict)
    glide_tokenizer: Any = None
    pad_id: int | None = None

    # ------------------------------------------------------------------ text and priors
    def _empty(self) -> dict:
        return {k: v[0] for k, v in self.clip.text([""]).items()}

    def image_embeddings(self, prompts, rng, *, prior: str = "diffusion", guidance_scale=None,
                         text: dict | None = None, x_T=None) -> jax.Array:  # fmt: skip
        """CLIP image embeddings [B, D] for the prompts from the chosen prior; `x_T` [B * N, D]
        (diffusion prior only) replaces its initial noise."""
        if prior not in PRIOR_TYPES:
            raise ValueError(f"unknown prior {prior!r}; expected one of {PRIOR_TYPES}")
        if x_T is not None and prior != "diffusion":
            raise ValueError(f"x_T is the diffusion prior's initial noise; prior is {prior!r}")
        text = self.clip.text(prompts) if text is None else text
        if prior == "none":
            return text["text_emb"]
        if prior not in self.priors:
            raise ValueError(f"this pipeline has no {prior!r} prior (has: {sorted(self.priors)})")
        stage = self.priors[prior]
        batch = len(prompts)
        scale = guidance_scale
        if scale is None:
            scale = stage.sample.get("guidance_scale", 1.0)
        if prior == "diffusion":
            from unclip_jax.pipelines.prior import conditioning, null_conditioning

            padded = _pad_text(text, stage.model.text_ctx)
            cond = conditioning(stage.model, padded["text_emb"], padded["text_tokens"],
                                padded["text_mask"])  # fmt: skip
            empty = None
            if not stage.model.learned_null:
                empty = {k: v[0] for k, v in _pad_text(self.clip.text([""]),
                                                       stage.model.text_ctx).items()}  # fmt: skip
            null = null_conditioning(stage.model, cond, empty)
            out = stage.sampler(stage.params, cond, rng, null_cond=null,
                                guidance_scale=_scales(scale, batch), x_T=x_T)  # fmt: skip
            return out["image_emb"]
        padded = _pad_text(text, stage.model.text_ctx)
        s = stage.sample
        out = stage.sampler(stage.params, stage.codec, padded["tokens"], padded["text_mask"],
                            padded["text_emb"], rng, guidance_scale=_scales(scale, batch),
                            temperature=s.get("temperature", 1.0), top_k=s.get("top_k", 0),
                            dot_percentile=s.get("dot_percentile", 50.0))  # fmt: skip
        return out["embeddings"]

    # ------------------------------------------------------------------ decoder
    def decoder_cond(self, image_emb, prompts: list[str] | None = None, text: dict | None = None):
        """The decoder's (cond, null_cond) for image embeddings and captions ("" when None)."""
        from unclip_jax.models.decoder import null_cond

        batch = image_emb.shape[0]
        prompts = [""] * batch if prompts is None else list(prompts)
        cond = {"image_emb": jnp.asarray(image_emb, jnp.float32),
                "drop_image": jnp.zeros((batch,), bool)}  # fmt: skip
        if self.decoder_model.text is not None:  # the paper's GLIDE text pathway
            from unclip_jax.tokenizers import glide_tokenize

            if self.glide_tokenizer is None or self.pad_id is None:
                raise ValueError("a 'glide' text pathway needs glide_tokenizer and pad_id")
            ctx = self.decoder_model.text.text_ctx
            tokens, mask = glide_tokenize(self.glide_tokenizer, prompts, ctx, self.pad_id)
            cond |= {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
            return cond, null_cond(cond, pad_id=self.pad_id)
        text = self.clip.text(prompts) if text is None else text
        cond |= {k: text[k] for k in ("text_emb", "text_tokens", "text_mask")}
        return cond, null_cond(cond, null_text=self._empty())

    def decode(self, image_emb, rng, *, prompts=None, text=None, guidance_scale=None,
               respacing=None, sampler=None, x_T=None, eta: float = 0.0, mesh=None):  # fmt: skip
        """64px (decoder-size) images [B, s, s, 3] in [-1, 1] from image embeddings."""
        s = self.decoder_sample
        cond, null = self.decoder_cond(image_emb, prompts, text)
        batch = cond["image_emb"].shape[0]
        scale = s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
        return self.decoder.sample(
            cond, rng, batch=batch, respacing=respacing or s.get("respacing", "250"),
            sampler=sampler or s.get("sampler", "ddpm"), null_cond=null,
            guidance_scale=_scales(scale, batch), x_T=x_T, eta=eta, mesh=mesh,
        )  # fmt: skip

    def upsample(self, images, rng, *, mesh=None) -> list:
        """Each upsampler in turn on the clamped previous output; returns every stage's images."""
        outs = []
        for i, (stage, s) in enumerate(self.upsamplers):
            low = jnp.clip(images, -1.0, 1.0)
            images = stage.sample({"low_res": low}, jax.random.fold_in(rng, i),
                                  batch=low.shape[0], respacing=s.get("respacing", "27"),
                                  sampler=s.get("sampler", "ddim"), mesh=mesh)  # fmt: skip
            outs.append(images)
        return outs

    def __call__(self, prompts: list[str], rng, *, prior: str = "diffusion",
                 prior_guidance=None, decoder_guidance=None, decoder_respacing=None,
                 decoder_sampler=None, upsample: bool = True, mesh=None) -> dict:  # fmt: skip
        """{"image_emb": [B, D], "decoded": [B, s, s, 3], "images": the last stage's output}."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        k_prior, k_dec, k_up = jax.random.split(rng, 3)
        text = self.clip.text(prompts)
        z = self.image_embeddings(prompts, k_prior, prior=prior, guidance_scale=prior_guidance,
                                  text=text)  # fmt: skip
        decoded = self.decode(z, k_dec, prompts=prompts, text=text,
                              guidance_scale=decoder_guidance, respacing=decoder_respacing,
                              sampler=decoder_sampler, mesh=mesh)  # fmt: skip
        out = {"image_emb": z, "decoded": decoded, "images": decoded}
        if upsample and self.upsamplers:
            stages = self.upsample(decoded, k_up, mesh=mesh)
            out["upsampled"] = stages
            out["images"] = stages[-1]
        return out

    # ------------------------------------------------------------------ manipulations
    def invert(self, images, *, respacing: str = "ddim50", fixed_point_iters: int = 2,
               guidance_scale=1.0):  # fmt: skip
        """(z_i [B, D], x_T [B, s, s, 3]): the bipartite latent of decoder-size images."""
        images = jnp.asarray(images, jnp.float32)
        size = self.decoder.sample_shape[0]
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected images [B, {size}, {size}, 3] in [-1, 1], got "
                             f"{images.shape}")  # fmt: skip
        z = self.clip.images(images)
        cond, null = self.decoder_cond(z)
        null, scales = _guidance(null, guidance_scale, images.shape[0])
        x_T = self.decoder.invert(images, cond, respacing=respacing, null_cond=null,
                                  guidance_scale=scales,
                                  fixed_point_iters=fixed_point_iters)  # fmt: skip
        return z, x_T

    def _decode_latents(self, z, x_T, rng, *, respacing, eta, guidance_scale):
        """DDIM from given latents with an empty caption; unguided (no null half) at scale 1."""
        cond, null = self.decoder_cond(z)
        null, scales = _guidance(null, guidance_scale, z.shape[0])
        return self.decoder.sample(cond, rng, batch=z.shape[0], respacing=respacing,
                                   sampler="ddim", null_cond=null, guidance_scale=scales,
                                   x_T=x_T, eta=eta)  # fmt: skip

    def variations(self, image, rng, *, n: int = 4, eta: float = 0.8,
                   respacing: str = "ddim50", guidance_scale=1.0) -> dict:  # fmt: skip
        """n variations of one decoder-size image [s, s, 3]: DDIM from its own (z_i, x_T) with
        eta > 0 (eta = 0 reconstructs it)."""
        z, x_T = self.invert(jnp.asarray(image)[None], respacing=respacing,
                             guidance_scale=guidance_scale)  # fmt: skip
        z_n, x_n = jnp.repeat(z, n, 0), jnp.repeat(x_T, n, 0)
        images = self._decode_latents(z_n, x_n, rng, respacing=respacing, eta=eta,
                                      guidance_scale=guidance_scale)  # fmt: skip
        return {"images": images, "image_emb": z, "x_T": x_T}

    def interpolate(self, image_a, image_b, rng, *, thetas=None, fixed_noise: bool = False,
                    respacing: str = "ddim50", guidance_scale=1.0) -> dict:  # fmt: skip
        """Images along slerp(z_a, z_b, theta), x_T slerped too (endpoints reconstruct both
        inputs) or one random x_T for every theta (`fixed_noise`, the paper's Figure 4)."""
        thetas = jnp.linspace(0, 1, 5) if thetas is None else jnp.asarray(thetas, jnp.float32)
        z, x_T = self.invert(jnp.stack([jnp.asarray(image_a), jnp.asarray(image_b)]),
                             respacing=respacing, guidance_scale=guidance_scale)  # fmt: skip
        zs = manipulations.interpolation_path(z[0], z[1], thetas)
        if fixed_noise:
            noise = jax.random.normal(jax.random.fold_in(rng, 1), x_T.shape[1:])
            xs = jnp.broadcast_to(noise, (thetas.shape[0],) + x_T.shape[1:])
        else:
            xs = manipulations.interpolation_path(x_T[0], x_T[1], thetas)
        images = self._decode_latents(zs, xs, rng, respacing=respacing, eta=0.0,
                                      guidance_scale=guidance_scale)  # fmt: skip
        return {"images": images, "thetas": np.asarray(thetas)}

    def text_diff(self, image, caption_from: str, caption_to: str, rng, *, thetas=None,
                  respacing: str = "ddim50", guidance_scale=1.0) -> dict:  # fmt: skip
        """Edit an image towards normalise(z_t(to) - z_t(from)) along a slerp with x_T fixed."""
        thetas = jnp.linspace(0, 0.5, 5) if thetas is None else jnp.asarray(thetas, jnp.float32)
        z, x_T = self.invert(jnp.asarray(image)[None], respacing=respacing,
                             guidance_scale=guidance_scale)  # fmt: skip
        text = self.clip.text([caption_to, caption_from])["text_emb"]
        direction = manipulations.text_diff_direction(text[0], text[1])
        zs = manipulations.text_diff_path(z[0], direction, thetas)
        xs = jnp.broadcast_to(x_T, (thetas.shape[0],) + x_T.shape[1:])
        images = self._decode_latents(zs, xs, rng, respacing=respacing, eta=0.0,
                                      guidance_scale=guidance_scale)  # fmt: skip
        return {"images": images, "thetas": np.asarray(thetas)}


# ------------------------------------------------------------------------------------------------
# Building the pipeline from training runs (their configs, EMA params and run files).


def _run_of_kind(path, kind: str, *, ema: bool = True):
    from unclip_jax.checkpoint import load_run

    config, params = load_run(path, ema=ema)
    if config.get("kind") != kind:
        raise ValueError(f"{path} is a {config.get('kind')!r} run, not a {kind!r} one")
    return config, params


def clip_from_run(path, dtype=None) -> ClipEncoder:
    """The CLIP encoder of a `clip` run (its params and the BPE in its tokenizer/ folder)."""
    from unclip_jax.models.clip import clip_from_config
    from unclip_jax.tokenizers import ClipTokenizer

    config, params = _run_of_kind(path, "clip", ema=False)  # CLIP's recipe has no EMA
    from unclip_jax.checkpoint import run_folder

    folder = run_folder(path) / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: a clip run saves its BPE there")
    context = config.model.text.context_length
    tokenizer = ClipTokenizer.from_pretrained(folder, context_length=context)
    return ClipEncoder(clip_from_config(config.model, dtype=sampling_dtype(dtype)), params,
                       tokenizer)  # fmt: skip


def prior_from_run(path, dtype=None) -> PriorStage:
    from unclip_jax.models.prior import prior_from_config
    from unclip_jax.pipelines.prior import sampler_from_config

    config, params = _run_of_kind(path, "prior")
    model = prior_from_config(config.model, dtype=sampling_dtype(dtype))
    return PriorStage("diffusion", sampler_from_config(model, config), params, model,
                      sample=dict(config.sample))  # fmt: skip


def ar_prior_from_run(path, dtype=None) -> PriorStage:
    from unclip_jax.checkpoint import run_folder
    from unclip_jax.models.ar_prior import ar_prior_from_config
    from unclip_jax.pipelines.ar_prior import ARPriorSampler
    from unclip_jax.train.unclip_kinds import load_codec

    config, params = _run_of_kind(path, "ar_prior")
    model = ar_prior_from_config(config.model, dtype=sampling_dtype(dtype))
    codec = load_codec(run_folder(path))
    return PriorStage("ar", ARPriorSampler(model), params, model, codec=codec,
                      sample=dict(config.sample))  # fmt: skip


def _stage(model, params, config, make_model_fn) -> DiffusionStage:
    size = model.image_size
    return DiffusionStage(make_model_fn(model), params, config.diffusion, (size, size, 3),
                          export_key=network_key(make_model_fn, model))  # fmt: skip


def pipeline_from_runs(*, clip, decoder, prior=None, ar_prior=None, upsamplers=(),
                       dtype=None) -> UnclipPipeline:  # fmt: skip
    """An UnclipPipeline from run folders (`unclip-jax train` workdirs); `dtype`: the networks'
    compute dtype (float32 or bfloat16; default float32; params stay float32)."""
    from unclip_jax.models.decoder import decoder_from_config, make_model_fn, upsampler_from_config
    from unclip_jax.tokenizers import glide_tokenizer_from_config

    compile_cache.enable()
    dec_config, dec_params = _run_of_kind(decoder, "decoder")
    dtype = sampling_dtype(dtype)
    dec_model = decoder_from_config(dec_config.model, dtype=dtype)
    glide = dec_model.text is not None
    pipe = UnclipPipeline(
        clip=clip_from_run(clip, dtype),
        decoder=_stage(dec_model, dec_params, dec_config, make_model_fn),
        decoder_model=dec_model,
        decoder_sample=dict(dec_config.sample),
        glide_tokenizer=glide_tokenizer_from_config(dec_config.data, decoder) if glide else None,
        pad_id=dec_config.model.text.pad_id if glide else None,
    )
    if prior is not None:
        pipe.priors["diffusion"] = prior_from_run(prior, dtype)
    if ar_prior is not None:
        pipe.priors["ar"] = ar_prior_from_run(ar_prior, dtype)
    for path in upsamplers:
        config, params = _run_of_kind(path, "upsampler")
        model = upsampler_from_config(config.model, dtype=dtype)
        # Converted Karlo upsamplers hold {"first", "last"}: the second network's final step.
        model_fn = make_last_step_model_fn if config.model.get("last_step") else make_model_fn
        pipe.upsamplers.append((_stage(model, params, config, model_fn),
                                dict(config.sample)))  # fmt: skip
    return pipe


def pipeline_from_diffusers(
    root,
    *,
    prior_config: str = "prior_diffusion:karlo",
    decoder_config: str = "decoder64:karlo",
    upsampler_config: str = "upsample256:karlo",
    dtype=None,
) -> UnclipPipeline:
    """An UnclipPipeline from a diffusers unCLIP folder: kakaobrain/karlo-v1-alpha's layout
    (text_encoder/ + tokenizer/ (CLIP), prior/, text_proj/ + decoder/, super_res_first/ (and
    super_res_last/, used for the final step)) or karlo-v1-alpha-image-variations' (image_encoder/
    instead of prior/: a pipeline without a prior, for `variations` and `decode` from image
    embeddings). image_encoder/ is read whenever present.

    Diffusion and sampling settings come from the named configs' `diffusion` and `sample`
    sections (Karlo's: prior 25 steps guidance 4, decoder learned range with guidance 8, super-res
    7 ancestral steps); the x_0 clamps from the folder's `*_scheduler/scheduler_config.json`
    where present (karlo-v1-alpha: prior 5.0, decoder and super-res 1.0), whose schedule,
    prediction and variance types must match the configs. `dtype`: the networks' compute dtype
    (float32 or bfloat16; default float32). Nothing is downloaded.
    """
    from unclip_jax import config_utils
    from unclip_jax.convert.clip import load_hf_clip
    from unclip_jax.convert.diffusers_prior import load_diffusers_prior
    from unclip_jax.convert.diffusers_unclip import (
        load_diffusers_decoder,
        load_diffusers_upsampler,
        scheduler_clamp,
    )
    from unclip_jax.models.clip import clip_from_config
    from unclip_jax.models.decoder import make_model_fn
    from unclip_jax.pipelines.prior import sampler_from_config
    from unclip_jax.tokenizers import ClipTokenizer

    compile_cache.enable()  # before the converters' first jitted op
    dtype = sampling_dtype(dtype)
    root = storage.local_copy(root) if storage.is_remote(root) else pathlib.Path(root)
    for name in ("text_encoder", "tokenizer", "text_proj", "decoder"):
        if not (root / name).is_dir():
            raise FileNotFoundError(f"{root / name} is missing: not a diffusers unCLIP folder")
    has_prior, has_images = (root / "prior").is_dir(), (root / "image_encoder").is_dir()
    if not (has_prior or has_images):
        raise FileNotFoundError(f"{root} has neither prior/ (text to image) nor image_encoder/ "
                                "(image variations): not a diffusers unCLIP folder")  # fmt: skip
    text_cfg, text_params = load_hf_clip(root / "text_encoder")
    text_model = clip_from_config(text_cfg, dtype=dtype)
    context = text_cfg.text.context_length
    tokenizer = ClipTokenizer.from_pretrained(root / "tokenizer", context_length=context)
    image_model = image_params = None
    if has_images:
        image_cfg, image_params = load_hf_clip(root / "image_encoder")
        image_model = clip_from_config(image_cfg, dtype=dtype)
    clip = ClipEncoder(text_model, text_params, tokenizer, image_model=image_model,
                       image_params=image_params)  # fmt: skip

    priors = {}
    if has_prior:
        prior_cfg = config_utils.load_config(prior_config)
        with prior_cfg.unlocked():
            prior_cfg.sample.clamp = scheduler_clamp(root, "prior", prior_cfg.diffusion,
                                                     prior_cfg.sample.get("clamp"))  # fmt: skip
        prior_model, prior_params = load_diffusers_prior(root / "prior", dtype=dtype)
        priors["diffusion"] = PriorStage(
            "diffusion", sampler_from_config(prior_model, prior_cfg), prior_params, prior_model,
            sample=dict(prior_cfg.sample),
        )  # fmt: skip

    dec_cfg = config_utils.load_config(decoder_config)
    dec_model, dec_params = load_diffusers_decoder(root, dtype=dtype)
    size = dec_model.image_size
    clamp = scheduler_clamp(root, "decoder", dec_cfg.diffusion, 1.0)
    decoder = DiffusionStage(make_model_fn(dec_model), dec_params, dec_cfg.diffusion,
                             (size, size, 3), clip_denoised=clamp is not None,
                             clip_range=1.0 if clamp is None else clamp,
                             export_key=network_key(make_model_fn, dec_model))  # fmt: skip
    pipe = UnclipPipeline(
        clip=clip,
        decoder=decoder,
        decoder_model=dec_model,
        priors=priors,
        decoder_sample=dict(dec_cfg.sample),
    )

    if (root / "super_res_first").is_dir():
        up_cfg = config_utils.load_config(upsampler_config)
        up_model, first = load_diffusers_upsampler(root / "super_res_first", low_res_size=size,
                                                   dtype=dtype)  # fmt: skip
        make_fn, params = make_model_fn, first
        if (root / "super_res_last").is_dir():
            _, last = load_diffusers_upsampler(root / "super_res_last", low_res_size=size,
                                               dtype=dtype)  # fmt: skip
            make_fn, params = make_last_step_model_fn, {"first": first, "last": last}
        shape = (up_model.image_size, up_model.image_size, 3)
        clamp = scheduler_clamp(root, "super_res", up_cfg.diffusion, 1.0)
        stage = DiffusionStage(make_fn(up_model), params, up_cfg.diffusion, shape,
                               clip_denoised=clamp is not None,
                               clip_range=1.0 if clamp is None else clamp,
                               export_key=network_key(make_fn, up_model))  # fmt: skip
        pipe.upsamplers.append((stage, dict(up_cfg.sample)))
    return pipe
