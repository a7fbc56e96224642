"""Contrastive training of CLIP and of GLIDE's noise-aware CLIP (SPEC 2.6, 3.1).

The loss is CLIP's symmetric cross-entropy over the GLOBAL batch: under a sharded `jax.jit` the
embeddings are global arrays (batch sharded along `data`), so `text @ image.T` is one [B, B] logits
matrix holding every device's pairs, as if on one device, with no hand-written all-gather (which
pmap-era code needed). XLA inserts the collectives.

Loss functions have the signature of the shared train step (train/step.py), `loss_fn(params,
batch, rng) -> (loss, metrics)`:

    tx, schedule = make_optimizer(config.optim)  # CLIP configs set decay_matrices_only
    state = init_train_state(model, tx, rng)
    step = jax.jit(make_train_step(make_clip_loss(model), tx, schedule), donate_argnums=0)

Batches: {"input_ids": [B, L] int32, "images": [B, H, W, C], optionally "eot_positions": [B]}.
Images for the noise-aware CLIP are clean images in [-1, 1]; the loss noises them.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from unclip_jax.diffusion import DiffusionTable, q_sample, sample_timesteps
from unclip_jax.models.clip import CLIP, init_params, l2_normalize
from unclip_jax.train.state import TrainState

LossFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]


def contrastive_loss(
    text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CLIP's loss: mean of the text->image and image->text cross-entropies, pair i <-> i.

    text_embeds, image_embeds [B, E] (unnormalised); logit_scale [] (already exp'd and clamped).
    Returns (loss [], metrics) in float32; metrics hold both retrieval accuracies in the batch.
    """
    if text_embeds.shape != image_embeds.shape or text_embeds.ndim != 2:
        raise ValueError(
            f"text {text_embeds.shape} and image {image_embeds.shape} embeddings must both be "
            "[B, E]"
        )
    logits = logit_scale * l2_normalize(text_embeds) @ l2_normalize(image_embeds).T  # [B, B]
    labels = jnp.arange(logits.shape[0])
    loss_t2i = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss_i2t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    loss = 0.5 * (loss_t2i + loss_i2t)
    metrics = {
        "loss": loss,
        "text_to_image_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "image_to_text_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
        "logit_scale": logit_scale,
    }
    return loss, metrics


def make_clip_loss(model: CLIP) -> LossFn:
    """loss_fn(params, batch, rng) for a two-tower CLIP (rng unused: CLIP has no dropout)."""
    _need_both(model)

    def loss_fn(params, batch, rng):
        del rng
        out = model.apply(
            {"params": params},
            batch["input_ids"],
            batch["images"],
            eot_positions=batch.get("eot_positions"),
        )
        return contrastive_loss(out.text_embeds, out.image_embeds, out.logit_scale)

    return loss_fn


def make_noised_clip_loss(model: CLIP, table: DiffusionTable) -> LossFn:
    """loss_fn(params, batch, rng) for the noise-aware CLIP: t ~ U[0, T), x_t = q_sample(x_0, t).

    `table` is the unrespaced diffusion of the model to be guided (GLIDE: cosine, 1000 steps), so
    the image tower sees exactly the noise levels it will be asked about while sampling.
    """
    _need_both(model)
    if model.vision.num_timesteps is None:
        raise ValueError("make_noised_clip_loss needs a noise-aware CLIP (vision.num_timesteps)")
    if model.vision.num_timesteps < int(table.timestep_map.max()) + 1:
        raise ValueError(
            f"the image tower knows {model.vision.num_timesteps} timesteps but the diffusion has "
            f"{int(table.timestep_map.max()) + 1}"
        )

    def loss_fn(params, batch, rng):
        images = batch["images"].astype(jnp.float32)
        t_rng, noise_rng = jax.random.split(rng)
        t = sample_timesteps(t_rng, images.shape[0], table)
        x_t = q_sample(table, images, t, jax.random.normal(noise_rng, images.shape, jnp.float32))
        out = model.apply(
            {"params": params},
            batch["input_ids"],
            x_t,
            timesteps=jnp.take(table.timestep_map, t),
            eot_positions=batch.get("eot_positions"),
        )
        return contrastive_loss(out.text_embeds, out.image_embeds, out.logit_scale)

    return loss_fn


def _need_both(model: CLIP) -> None:
    if model.text is None or model.vision is None:
        raise ValueError("contrastive training needs both towers (text and vision configs)")


# ------------------------------------------------------------------------------------------------
# Optimizer and state for the shared train step (train/step.py).


def init_train_state(model: CLIP, tx: optax.GradientTransformation, rng) -> TrainState:
    """Fresh params (unboxed: optax sees plain arrays), EMA and optimizer state, step 0.

    One jitted program: run eagerly, every initialiser would compile on its own. (For sharded
    init use the boxed `models.clip.init_params` with the shared sharded-init helpers.)
    """

    @jax.jit
    def init(rng):
        return TrainState.create(nn.meta.unbox(init_params(model, rng)), tx)

    return init(rng)
