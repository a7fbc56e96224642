"""The autoregressive prior's training loss (SPEC 3.3): cross-entropy on PCA-bucket codes.

The codec (fitted beforehand with `models.ar_prior.fit_codec`) is a frozen argument bound with
functools.partial, never part of the params, so neither the gradients nor the optimizer's weight
decay can touch it. The conditioning (caption, text embedding and dot-product token) is dropped
together with probability `cond_drop` (0.1 in the paper) by setting the model's `null` flag, which
trains the learned null branch of classifier-free guidance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from unclip_jax.models.ar_prior import ARPrior, EmbeddingCodec


def ar_prior_loss(
    params,
    batch: dict,
    rng,
    *,
    model: ARPrior,
    codec: EmbeddingCodec,
    cond_drop: float = 0.1,
):
    """Mean per-code cross-entropy (nats) and metrics.

    batch: image_emb [B, D], text_emb [B, D] (raw CLIP space), tokens [B, T] int, mask [B, T] bool.
    Returns (loss, metrics) with metrics {"loss", "accuracy", "first_code_loss", "nonfinite"}.
    """
    image_emb = jnp.asarray(batch["image_emb"], jnp.float32)
    text_emb = jnp.asarray(batch["text_emb"], jnp.float32)
    codes = codec.encode(image_emb)
    dot = codec.dot_token(image_emb, text_emb)
    null = jax.random.bernoulli(rng, cond_drop, (image_emb.shape[0],))
    logits = model.apply({"params": params}, batch["tokens"], batch["mask"], text_emb, dot, codes,
                         null)  # fmt: skip
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)  # [B, K]
    loss = jnp.mean(ce)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == codes),
        "first_code_loss": jnp.mean(ce[:, 0]),
        "nonfinite": jnp.mean(~jnp.isfinite(ce.sum(-1))),
    }
    return loss, metrics
