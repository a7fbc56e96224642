"""GLIDE: prompt -> tokens -> 64px base with classifier-free guidance -> upsampler -> images.

Each stage is one jitted sampler of the diffusion core (compiled once per stage, sampler, step
count and batch shape); the stages are composed on the host. Inpainting puts the known pixels back
into every predicted x0 (`denoised_fn`) at both stages; the upsampler sees the 8-bit quantised base
output (SPEC 2.4, 2.5). Batches are sharded along `data` when a mesh is given.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax import compile_cache, diffusion
from unclip_jax.imaging import area_downsample, nearest_downsample, quantize_8bit
from unclip_jax.models.glide import GlideUNet
from unclip_jax.pipelines.stage import exported_sampler, network_key, sampling_dtype
from unclip_jax.tokenizers import glide_tokenize

log = logging.getLogger(__name__)


def _apply(model: GlideUNet, params, x, t, cond):
    return model.apply(
        {"params": params},
        x,
        t,
        cond["tokens"],
        cond["mask"],
        low_res=cond.get("low_res"),
        inpaint_image=cond.get("inpaint_image"),
        inpaint_mask=cond.get("inpaint_mask"),
    )


def keep_known_pixels(x0, t_model, cond):
    """denoised_fn for inpainting: x0 outside the mask, the known image inside it."""
    mask = cond["inpaint_mask"]
    return x0 * (1.0 - mask) + cond["inpaint_image"] * mask


@dataclass
class GlideStage:
    """One model of the cascade: the network, its params and its diffusion config section."""

    model: GlideUNet
    params: Any
    diffusion: Any  # ConfigDict: schedule, num_timesteps, mean/var/loss type

    def __post_init__(self):
        compile_cache.enable()
        # One function object per stage: the jitted samplers treat it as a static argument.
        self.model_fn = functools.partial(_apply, self.model)
        self._export_key = network_key(_apply, self.model)  # names model_fn for the exports
        self._exported: dict = {}

    def sample(self, cond, rng, *, respacing: str, sampler: str = "ddpm", null_cond=None,
               guidance_scale=None, temperature: float = 1.0, inpaint: bool = False,
               eta: float = 0.0, cond_fn=None, mesh=None):  # fmt: skip
        """Images [B, H, W, 3] in [-1, 1] for the per-example conditioning `cond`."""
        table = diffusion.diffusion_from_config(self.diffusion, respacing)
        batch = cond["tokens"].shape[0]
        size = self.model.image_size
        k_noise, k_sample = jax.random.split(rng)
        x_T = diffusion.noise_like(k_noise, (batch, size, size, 3), temperature)
        kwargs = dict(null_cond=null_cond, guidance_scale=guidance_scale, clip_denoised=True,
                      denoised_fn=keep_known_pixels if inpaint else None,
                      cond_fn=cond_fn)  # fmt: skip
        if sampler == "ddim":
            kwargs["eta"] = eta
        if mesh is not None:
            sharding = NamedSharding(mesh, P("data"))
            put = functools.partial(jax.device_put, device=sharding)
            # Per-example inputs go along `data`; guidance params (cond["clip"]) stay as they are.
            x_T = put(x_T)
            cond = {k: v if k == "clip" else jax.tree.map(put, v) for k, v in cond.items()}
            kwargs["null_cond"] = None if null_cond is None else jax.tree.map(put, null_cond)
            if guidance_scale is not None:
                kwargs["guidance_scale"] = put(jnp.broadcast_to(guidance_scale, (batch,)))
            kwargs["sharding"] = sharding
        if cond_fn is None and not inpaint:  # traced once per machine (compile_cache.Exported)
            run = exported_sampler(self._exported, self.model_fn, self._export_key, sampler,
                                   kwargs.get("sharding"), clip_denoised=True)  # fmt: skip
            return run(table, self.params, x_T, k_sample, cond, kwargs["null_cond"],
                       kwargs["guidance_scale"], jnp.float32(1.0), jnp.float32(eta))  # fmt: skip
        return diffusion.sample(sampler, self.model_fn, table, self.params, x_T, k_sample, cond,
                                **kwargs)  # fmt: skip


@dataclass
class GlidePipeline:
    """Text to images with GLIDE: the base stage, then (optionally) the upsampler.

    The null condition of classifier-free guidance is the empty caption. Guidance applies to the
    base stage only, as released.
    """

    base: GlideStage
    tokenizer: Any
    upsampler: GlideStage | None = None
    pad_id: int | None = None

    def _tokens(self, stage: GlideStage, prompts):
        pad = stage.model.text.vocab_size - 1 if self.pad_id is None else self.pad_id
        return glide_tokenize(self.tokenizer, prompts, stage.model.text.text_ctx, pad)

    def __call__(self, prompts: list[str], rng, *, guidance_scale=3.0, base_respacing="100",
                 base_sampler="ddpm", upsample_respacing="fast27", upsample_sampler="ddim",
                 upsample_temperature=0.997, inpaint_image=None, inpaint_mask=None,
                 clip_guidance=None, mesh=None) -> dict:  # fmt: skip
        """{"base": [B, 64, 64, 3], "images": [B, 256, 256, 3] (or the base without upsampler)}.

        guidance_scale: a number or one per prompt (classifier-free guidance). inpaint_image
        [B, H, W, 3] in [-1, 1] and inpaint_mask [B, H, W, 1] (1 = keep) at the upsampler's (or
        the base's) resolution. clip_guidance: (ClipGuidance(noised_clip), clip_guidance_cond(...))
        guides the base stage by a noise-aware CLIP's gradient instead of classifier-free guidance
        (GLIDE uses one or the other; pass guidance_scale=None with it).
        """
        k_base, k_up = jax.random.split(rng)
        batch = len(prompts)
        tokens, mask = self._tokens(self.base, prompts)
        null_tokens, null_mask = self._tokens(self.base, [""] * batch)
        cond = {"tokens": tokens, "mask": mask}
        null = {"tokens": null_tokens, "mask": null_mask}
        cond_fn = None
        if clip_guidance is not None:
            if guidance_scale is not None:
                raise ValueError("CLIP guidance replaces classifier-free guidance: pass "
                                 "guidance_scale=None with clip_guidance")  # fmt: skip
            cond_fn, cond["clip"] = clip_guidance
        inpaint = inpaint_image is not None
        if inpaint:
            if inpaint_mask is None:
                raise ValueError("inpainting needs inpaint_mask as well as inpaint_image")
            size = self.base.model.image_size
            small_image = area_downsample(jnp.asarray(inpaint_image, jnp.float32), size)
            small_mask = nearest_downsample(jnp.asarray(inpaint_mask, jnp.float32), size)
            for c in (cond, null):
                c["inpaint_image"], c["inpaint_mask"] = small_image, small_mask
        if guidance_scale is None:
            null, scale = None, None
        else:
            scale = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (batch,))
        base = self.base.sample(
            cond, k_base, respacing=base_respacing, sampler=base_sampler, null_cond=null,
            guidance_scale=scale, inpaint=inpaint, cond_fn=cond_fn, mesh=mesh,
        )  # fmt: skip
        out = {"base": base, "images": base}
        if self.upsampler is not None:
            up_tokens, up_mask = self._tokens(self.upsampler, prompts)
            up_cond = {"tokens": up_tokens, "mask": up_mask, "low_res": quantize_8bit(base)}
            if inpaint:
                up_cond["inpaint_image"] = jnp.asarray(inpaint_image, jnp.float32)
                up_cond["inpaint_mask"] = jnp.asarray(inpaint_mask, jnp.float32)
            out["images"] = self.upsampler.sample(
                up_cond, k_up, respacing=upsample_respacing, sampler=upsample_sampler,
                temperature=upsample_temperature, inpaint=inpaint, mesh=mesh,
            )  # fmt: skip
        return out


def clip_guidance_from_run(path, prompts: list[str], scale, *, stage: GlideStage):
    """GLIDE's CLIP guidance from a noise-aware CLIP run (`train --config noised_clip_b64`):
    (ClipGuidance, cond["clip"]) for `GlidePipeline(..., clip_guidance=)`. scale: a number or
    one per prompt. The tower must take the base stage's image size and know every timestep of
    its diffusion (it was trained on that chain's noise levels)."""
    from unclip_jax.models.clip_guidance import ClipGuidance, clip_guidance_cond
    from unclip_jax.pipelines.unclip import clip_from_run

    encoder = clip_from_run(path)
    model, vision = encoder.model, encoder.model.vision
    if vision is None or vision.num_timesteps is None:
        raise ValueError(f"{path} is a CLIP without a noise-aware image tower: CLIP guidance needs "
                         "one (unclip-jax train --config noised_clip_b64)")  # fmt: skip
    size, steps = stage.model.image_size, int(stage.diffusion.num_timesteps)
    if vision.image_size != size:
        raise ValueError(f"the noise-aware CLIP of {path} sees {vision.image_size} px images; the "
                         f"base stage samples {size} px")  # fmt: skip
    if vision.num_timesteps < steps:
        raise ValueError(f"the noise-aware CLIP of {path} knows {vision.num_timesteps} timesteps; "
                         f"the base diffusion has {steps}")  # fmt: skip
    tokens = encoder.tokenizer(prompts)
    scales = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (len(prompts),))
    cond = clip_guidance_cond(model, encoder.params, jnp.asarray(tokens.input_ids), scales,
                              eot_positions=jnp.asarray(tokens.eot_positions))  # fmt: skip
    return ClipGuidance(model), cond


def stage_from_run(path, dtype=None) -> tuple[GlideStage, object]:
    """(GlideStage, config) from a training run's workdir (its config and EMA params); `dtype`
    is the compute dtype (default float32; params stay float32)."""
    from unclip_jax.checkpoint import load_run
    from unclip_jax.models.glide import glide_from_config

    config, params = load_run(path)
    if config.get("kind") != "glide":
        raise ValueError(f"{path} is a {config.get('kind')!r} run, not a GLIDE one")
    model = glide_from_config(config.model, dtype=sampling_dtype(dtype))
    return GlideStage(model, params, config.diffusion), config


def pipeline_from_runs(base, upsampler=None, *, dtype=None) -> GlidePipeline:
    """GlidePipeline from run folders: the base (and an optional upsampler) with their tokenizer;
    `dtype`: the networks' compute dtype (float32 or bfloat16; default float32)."""
    from unclip_jax.checkpoint import run_folder
    from unclip_jax.tokenizers import glide_tokenizer_from_config

    compile_cache.enable()
    base_stage, config = stage_from_run(base, dtype)
    up_stage = None
    if upsampler is not None:
        up_stage, _ = stage_from_run(upsampler, dtype)
        if "upsample" not in up_stage.model.mode:
            raise ValueError(f"{upsampler} holds a {up_stage.model.mode!r} model, not an "
                             "upsampler")  # fmt: skip
    tokenizer = glide_tokenizer_from_config(config.data, run_folder(base))
    return GlidePipeline(base_stage, tokenizer, up_stage, pad_id=config.model.text.pad_id)
