"""The diffusion prior's training loss (SPEC 1.3, 3.2): x_0-prediction MSE in the scaled space.

L_prior = E_{t, z_t} || f(z_t, t, y) - z ||^2 with z the scaled CLIP image embedding
(`scale_image_embedding`: Karlo's standardisation, whose statistics get no gradient, or the paper's
L2 norm x 17.2). The text conditioning is dropped with probability `text_drop` (the paper's 10%,
Karlo's config 20%) to train the null branch of classifier-free guidance:
- a prior with `learned_null` gets cond["null"] = True (learned text embedding, no text tokens);
- otherwise the dropped examples get `null_text`, the CLIP encoding of the empty prompt (Karlo and
  diffusers' unconditional input), which the caller passes once (un-batched).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unclip_jax import diffusion
from unclip_jax.models.prior import DiffusionPrior, scale_image_embedding


def drop_text(rng, cond: dict, rate: float, *, learned_null: bool, null_text: dict | None = None):
    """Conditioning with the text dropped for a random `rate` of the examples.

    cond: text_emb [B, D], text_tokens [B, L, Dt], text_mask [B, L]. With learned_null the result
    carries "null" [B] bool; otherwise null_text (text_emb [D], text_tokens [L, Dt], text_mask [L])
    replaces the dropped examples' entries.
    """
    batch = cond["text_emb"].shape[0]
    drop = jax.random.bernoulli(rng, rate, (batch,))
    if learned_null:
        return dict(cond, null=drop)
    if rate > 0 and null_text is None:
        raise ValueError("dropping text without a learned null needs null_text (the encoding of "
                         "the empty prompt)")  # fmt: skip
    if null_text is None:
        return cond
    out = {}
    for key in ("text_emb", "text_tokens", "text_mask"):
        value, null = cond[key], jnp.asarray(null_text[key]).astype(cond[key].dtype)
        where = drop.reshape((batch,) + (1,) * (value.ndim - 1))
        out[key] = jnp.where(where, null[None], value)
    return out


def prior_loss(
    params,
    batch: dict,
    rng,
    *,
    model: DiffusionPrior,
    table: diffusion.DiffusionTable,
    text_drop: float = 0.1,
    null_text: dict | None = None,
    train: bool = True,
):
    """Mean x_0 MSE over the batch and its metrics (the shared train step's loss_fn).

    batch: image_emb [B, D] (raw CLIP image embeddings), text_emb [B, D], text_tokens [B, L, Dt],
    text_mask [B, L] bool. Returns (loss, {"loss", "mse", "nonfinite"}).
    """
    if table.mean_type != diffusion.ModelMeanType.START_X:
        raise ValueError(f"the prior predicts x_0; the table's mean type is {table.mean_type}")
    z = jnp.asarray(batch["image_emb"], jnp.float32)
    k_drop, k_t, k_noise = jax.random.split(rng, 3)
    cond = {k: jnp.asarray(batch[k]) for k in ("text_emb", "text_tokens", "text_mask")}
    cond = drop_text(k_drop, cond, text_drop, learned_null=model.learned_null, null_text=null_text)
    x_start = scale_image_embedding(model, params, z)

    def model_fn(x_t, t_model):
        return model.apply({"params": params}, x_t, t_model, cond, train=train)

    t = diffusion.sample_timesteps(k_t, z.shape[0], table)
    noise = jax.random.normal(k_noise, z.shape, jnp.float32)
    terms = diffusion.training_losses(table, model_fn, x_start, t, noise)
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    return metrics["loss"], metrics
