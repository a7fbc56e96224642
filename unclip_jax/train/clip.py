"""Contrastive training of CLIP and of GLIDE's noise-aware CLIP (SPEC 2.6, 3.1).

The loss is CLIP's symmetric cross-entropy over the GLOBAL batch: under a sharded `jax.jit` the
embeddings are global arrays (batch sharded along `data`), so `text @ image.T` is one [B, B] logits
matrix holding every device's pairs, as if on one device, with no hand-written all-gather (which
pmap-era code needed). XLA inserts the collectives.

Loss functions have the signature the shared train step takes, `loss_fn(params, batch, rng) ->
(loss, metrics)`; until that step lands, `make_train_step` is a plain jitted, donated one.

Batches: {"input_ids": [B, L] int32, "images": [B, H, W, C], optionally "eot_positions": [B]}.
Images for the noise-aware CLIP are clean images in [-1, 1]; the loss noises them.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from unclip_jax.diffusion import DiffusionTable, q_sample, sample_timesteps
from unclip_jax.models.clip import CLIP, init_params, l2_normalize

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
# A plain train step (the shared, sharded one belongs to the distributed-training issue).


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def clip_optimizer(optim) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay (CLIP paper, Table 19 defaults in the configs).

    `optim`: a config section with lr, b1, b2, eps, weight_decay, warmup_steps, steps, grad_clip.
    Weight decay skips gains, biases, the class token and the logit scale (every tensor with fewer
    than two dimensions), as OpenAI's training did.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, max(int(optim.warmup_steps), 1), max(int(optim.steps), 2)
    )
    adam = optax.adamw(
        schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    clip = optim.get("grad_clip")
    return optax.chain(optax.clip_by_global_norm(clip), adam) if clip else adam


def create_train_state(model: CLIP, optimizer: optax.GradientTransformation, rng) -> TrainState:
    """Fresh params (unboxed: optax sees plain arrays) and optimizer state, step 0."""
    params = nn.meta.unbox(init_params(model, rng))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """step(state, batch, rng) -> (state, metrics), jitted with the state donated.

    The per-step rng is fold_in(rng, step). A non-finite loss leaves params and optimizer state
    unchanged (metrics["nonfinite"] = 1) instead of poisoning them.
    """

    def step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = TrainState(
            state.step + 1,
            jax.tree.map(keep, params, state.params),
            jax.tree.map(keep, opt_state, state.opt_state),
        )
        metrics = dict(
            metrics,
            grad_norm=optax.global_norm(grads),
            param_norm=optax.global_norm(state.params),
            nonfinite=(~finite).astype(jnp.float32),
        )
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)
