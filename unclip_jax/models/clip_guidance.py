"""CLIP guidance (GLIDE, SPEC 2.6): the samplers' `cond_fn` built from a noise-aware CLIP.

    grad = d/dx_t [ s * logit_scale * <z_text, z_img(x_t, t)> ],  z = unit-norm embeddings

with the logit scale of the CLIP's params (clamped; 100 for GLIDE's released model, whose scale is
fixed at log 100) and s the guidance scale, one per example. Ancestral samplers add
variance * grad to the mean (`condition_mean`), DDIM shifts eps (`condition_score`).

The samplers take `cond_fn(x, t_model, cond)` as a static argument and pass `cond` through, so
everything that changes between calls travels in `cond["clip"]` (see `clip_guidance_cond`): the
CLIP's params, the normalised text embeddings [B, E] and the scales [B]. New prompts, scales or
CLIP weights therefore never recompile the sampler, and the weights are not baked into it.

Caveat: the samplers' classifier-free-guidance batching requires every `cond` leaf to have the
batch as first axis, which the CLIP params do not; GLIDE uses CLIP guidance instead of
classifier-free guidance, not with it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from unclip_jax.models.clip import CLIP, l2_normalize


@dataclasses.dataclass(frozen=True)
class ClipGuidance:
    """A hashable cond_fn: equal models give equal cond_fns, so repeated sampler calls reuse one
    compilation. x [B, H, W, C] in the diffusion's [-1, 1] scale; t_model [B] original-chain
    timesteps (the noise-aware tower was trained on them); returns grad [B, H, W, C] float32."""

    model: CLIP
    key: str = "clip"

    def __post_init__(self):
        if self.model.vision is None or self.model.text is None:
            raise ValueError("CLIP guidance needs a two-tower CLIP (its logit scale, its images)")
        if self.model.vision.num_timesteps is None:
            raise ValueError("CLIP guidance needs a noise-aware CLIP (vision.num_timesteps)")
        if not self.model.vision.normalize_input:
            raise ValueError(
                "CLIP guidance differentiates through the pixel normalisation: the image tower "
                "must take [-1, 1] inputs (vision.normalize_input=True)"
            )

    def __call__(self, x: jax.Array, t_model: jax.Array, cond: dict) -> jax.Array:
        if self.key not in cond:
            raise KeyError(f"CLIP guidance reads cond[{self.key!r}]; build it with "
                           "clip_guidance_cond")  # fmt: skip
        c = cond[self.key]
        text, scale = c["text_embeds"], c["scale"]

        def similarity(x):
            out = self.model.apply({"params": c["params"]}, images=x, timesteps=t_model)
            dots = jnp.sum(text * l2_normalize(out.image_embeds), axis=-1)  # [B]
            # Each example's grad depends only on its own x, so one grad of the sum gives them all.
            return jnp.sum(scale * out.logit_scale * dots)

        return jax.grad(similarity)(x.astype(jnp.float32))


def clip_guidance_cond(
    model: CLIP,
    params,
    input_ids: jax.Array,
    scale,
    *,
    eot_positions: jax.Array | None = None,
) -> dict:
    """The `cond["clip"]` entry for ClipGuidance: params, normalised text embeddings, scales.

    input_ids [B, L] (e.g. ClipTokenizer(prompts).input_ids); scale: scalar or [B].
    """
    batch = input_ids.shape[0]
    return {
        "params": params,
        "text_embeds": _text_embeds(model, params, input_ids, eot_positions),
        "scale": jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (batch,)),
    }


@functools.partial(jax.jit, static_argnums=0)
def _text_embeds(model: CLIP, params, input_ids, eot_positions):
    out = model.apply({"params": params}, input_ids, eot_positions=eot_positions)
    return l2_normalize(out.text_embeds)
