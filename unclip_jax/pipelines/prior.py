"""Sampling CLIP image embeddings from the diffusion prior (SPEC 3.2, 4.2).

One jitted function per (prior, table, candidates, batch shape): the whole respaced loop (the
diffusion core's samplers), classifier-free guidance on the predicted x_0 with a per-example scale,
the optional x_0 clamp, de-scaling back to raw CLIP space, and best-of-N selection. The N candidates
of every caption are sampled in the same batch (B x N) and the one with the largest dot product with
the caption's CLIP text embedding is kept (the paper: N = 2; Karlo: N = 1).

Defaults: the paper samples 64 strided steps with Analytic-DPM variances, which no released code
implements; we use the ancestral sampler with the fixed small (posterior) variance there, as Karlo
does with its 25 steps. Karlo clamps the standardised x_0 to [-10, 10] (its `denoised_fn`); here
that is the static clamp `clip_denoised` with `clip_range` = the clamp, the same operation.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax import compile_cache, diffusion
from unclip_jax.models.prior import DiffusionPrior, unscale_image_embedding


def _apply(model: DiffusionPrior, params, x, t, cond):
    return model.apply({"params": params}, x, t, cond)


def conditioning(model: DiffusionPrior, text_emb, text_tokens, text_mask) -> dict:
    """The prior's cond from CLIP text outputs [B, D], [B, L, Dt], [B, L] (null flags if needed)."""
    cond = {
        "text_emb": jnp.asarray(text_emb, jnp.float32),
        "text_tokens": jnp.asarray(text_tokens, jnp.float32),
        "text_mask": jnp.asarray(text_mask, bool),
    }
    if model.learned_null:
        cond["null"] = jnp.zeros((cond["text_emb"].shape[0],), bool)
    return cond


def null_conditioning(model: DiffusionPrior, cond: dict, empty: dict | None = None) -> dict:
    """The null branch of classifier-free guidance, with cond's structure and batch.

    A prior with a learned null sets cond["null"] = True. Otherwise `empty` holds the CLIP encoding
    of the empty prompt (text_emb [D], text_tokens [L, Dt], text_mask [L]), broadcast to the batch
    (Karlo and diffusers' unconditional input).
    """
    batch = cond["text_emb"].shape[0]
    if model.learned_null:
        return dict(cond, null=jnp.ones((batch,), bool))
    if empty is None:
        raise ValueError("a prior without a learned null needs the empty prompt's encoding")
    return {k: jnp.broadcast_to(jnp.asarray(empty[k], cond[k].dtype), cond[k].shape) for k in cond}


class PriorSampler:
    """Samples raw CLIP image embeddings for a batch of captions (best of `num_candidates`).

    prior_sampler(params, cond, rng, null_cond=..., guidance_scale=[B]) -> dict with
      image_emb [B, D] (the chosen candidate, raw CLIP space), candidates [B, N, D], scores [B, N]
      (dot products with cond["text_emb"]) and best [B] (the chosen index).
    Params, rng, conditioning, guidance scales and the clamp are traced: new weights, seeds or
    scales never recompile; `compilations` counts the programs built: traced here, or read from
    disk (a program another process traced, compile_cache.Exported).
    """

    def __init__(self, model: DiffusionPrior, diffusion_config, *, respacing: str = "64",
                 sampler: str = "ddpm", num_candidates: int = 1, clamp: float | None = None,
                 temperature: float = 1.0):  # fmt: skip
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        compile_cache.enable()
        self.model = model
        self.table = diffusion.diffusion_from_config(diffusion_config, respacing)
        if self.table.mean_type != diffusion.ModelMeanType.START_X:
            raise ValueError("the prior's diffusion config must predict x_0 (mean_type start_x)")
        self.sampler = sampler
        self.num_candidates = num_candidates
        self.clamp = clamp
        self.temperature = temperature
        # One function object for the sampler's static model_fn argument.
        self.model_fn = functools.partial(_apply, model)
        self._traces = 0
        # Traced once per machine: later processes read the program (compile_cache.Exported).
        key = f"PriorSampler/{model!r}/{sampler}/{num_candidates}/{clamp is None}/{temperature}"
        self._jitted = compile_cache.Exported(self._sample, key)

    @property
    def compilations(self) -> int:
        return self._traces + self._jitted.traced_from_disk

    def _sample(self, params, table, cond, rng, null_cond, guidance_scale, clamp, x_T):
        self._traces += 1  # runs once per trace
        n = self.num_candidates
        batch = cond["text_emb"].shape[0]
        repeat = functools.partial(jnp.repeat, repeats=n, axis=0)
        kwargs = dict(clip_denoised=self.clamp is not None, clip_range=clamp)
        if null_cond is not None:
            kwargs.update(null_cond=jax.tree.map(repeat, null_cond),
                          guidance_scale=repeat(guidance_scale))  # fmt: skip
        k_noise, k_sample = diffusion.split_sampler_rng(rng)
        if x_T is None:
            x_T = diffusion.noise_like(k_noise, (batch * n, self.model.clip_dim), self.temperature)
        x0 = diffusion.sample(self.sampler, self.model_fn, table, params, x_T, k_sample,
                              jax.tree.map(repeat, cond), **kwargs)  # fmt: skip
        candidates = unscale_image_embedding(self.model, params, x0).reshape(batch, n, -1)
        scores = jnp.einsum("bnd,bd->bn", candidates, cond["text_emb"].astype(jnp.float32))
        best = jnp.argmax(scores, axis=1)
        chosen = jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]
        return dict(image_emb=chosen, candidates=candidates, scores=scores, best=best)

    def __call__(self, params, cond: dict, rng, *, null_cond: dict | None = None,
                 guidance_scale: Any = None, x_T=None) -> dict:  # fmt: skip
        """`x_T` [B * N, D] (the standardised initial latents, candidates of a caption adjacent)
        replaces the initial noise drawn from `rng`; the step noise comes from `rng` either way."""
        if (null_cond is None) != (guidance_scale is None):
            raise ValueError("classifier-free guidance needs both null_cond and guidance_scale")
        if x_T is not None:
            expected = (cond["text_emb"].shape[0] * self.num_candidates, self.model.clip_dim)
            if tuple(x_T.shape) != expected:
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {expected}")
            x_T = jnp.asarray(x_T, jnp.float32)
        clamp = jnp.asarray(1.0 if self.clamp is None else self.clamp, jnp.float32)
        if guidance_scale is not None:
            # One strongly typed [B] array whatever was passed (a number, a list, a weak array),
            # so that every scale shares one compilation.
            batch = cond["text_emb"].shape[0]
            scale = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (batch,))
            guidance_scale = jax.lax.convert_element_type(scale, jnp.float32)
        return self._jitted(params, self.table, cond, rng, null_cond, guidance_scale, clamp, x_T)


def sampler_from_config(model: DiffusionPrior, config) -> PriorSampler:
    """A PriorSampler from a prior config (its `diffusion` and `sample` sections)."""
    s = config.sample
    return PriorSampler(model, config.diffusion, respacing=s.respacing, sampler=s.sampler,
                        num_candidates=s.num_candidates, clamp=s.get("clamp"))  # fmt: skip
