"""unCLIP's diffusion prior (SPEC 3.2, 4.2): a causal transformer that predicts a clean CLIP image
embedding from a noised one and the caption.

The sequence, in order (L + 4 positions, width W):
    [text_enc_proj(text tokens) (L), text_emb_proj(text embedding), time_embed(t),
     clip_img_proj(x_t), prd_emb]  + positional_embedding
A causal mask plus a key-padding mask over the text tokens (the four extra positions are always
valid) bounds the attention; pre-LN blocks, a final LayerNorm, and the output at the last position
(the learned prediction token) projected back to the embedding dimension is the predicted x_0.

The diffusion runs in a scaled embedding space, chosen by `scaling`:
- "standardize" (Karlo): per-dimension (z - clip_mean) / clip_std with dataset statistics stored in
  the params as `clip_mean`, `clip_std` (frozen in training: `optim.frozen_params`).
- "l2" (the paper): z / |z| * 17.2 ("inputs scaled by 17.2", SPEC 3.2); de-scaling divides by 17.2,
  so the result is a unit-norm embedding.
Text conditioning (CLIP text embedding and per-token CLIP features, Karlo's inputs) enters raw in
both variants; the paper's own text encoder with ctx 256 is replaced by CLIP token features padded
to `text_ctx` (the padded positions are masked out).

Names follow Karlo's PriorTransformer (clip_img_proj, text_emb_proj, text_enc_proj, time_embed_0/2,
positional_embedding, prd_emb, transformer/resblocks_i/..., final_ln, out_proj) so that diffusers'
PriorTransformer converts by a name map (convert/diffusers_prior.py).

Null conditioning (classifier-free guidance): with `learned_null`, cond["null"] [B] bool replaces
the text embedding by a learned `null_text_emb` and masks out every text token (the empty caption,
as GLIDE's all-padding null). Without it (Karlo, diffusers) the null branch is the CLIP encoding of
the empty prompt, passed as ordinary conditioning.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import axes
from unclip_jax.models.layers import Dtype, dense, layer_norm, silu, timestep_embedding
from unclip_jax.models.text_transformer import MLP

_ACTIVATION = (axes.BATCH, axes.LENGTH, axes.EMBED)
SCALINGS = ("standardize", "l2")


def masked_attention(q, k, v, mask):
    """Softmax attention in float32 with a full mask [B, Lq, Lk] (True = attend).

    q, k, v [B, L, N, D]; q and k each scaled by D^-1/4. A row with no allowed key (a padded text
    position before any real token) gets uniform weights; no valid position ever reads it.
    """
    scale = q.shape[-1] ** -0.25
    logits = jnp.einsum("bqnd,bknd->bnqk", q * scale, k * scale).astype(jnp.float32)
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", weights, v)


class MaskedSelfAttention(nn.Module):
    """Self-attention with one c_qkv projection laid out per head as [q | k | v] (Karlo's xf)."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, length, width = x.shape
        qkv = dense(3 * width, (axes.EMBED, axes.HEADS), name="c_qkv", **kw)(x)
        q, k, v = jnp.split(qkv.reshape(b, length, self.heads, -1), 3, axis=-1)
        out = masked_attention(q, k, v, mask).reshape(b, length, width)
        return dense(width, (axes.HEADS, axes.EMBED), name="c_proj", **kw)(out)


class Block(nn.Module):
    """Pre-LN residual block; the residual stream is float32, matmuls run in `dtype`."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(self.param_dtype, name="ln_1")(x).astype(self.dtype)
        x = x + MaskedSelfAttention(self.heads, name="attn", **kw)(h, mask).astype(jnp.float32)
        h = layer_norm(self.param_dtype, name="ln_2")(x).astype(self.dtype)
        x = x + MLP(name="mlp", **kw)(h).astype(jnp.float32)
        return nn.with_logical_constraint(x, _ACTIVATION)


class Transformer(nn.Module):
    layers: int
    heads: int
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        block = nn.remat(Block) if self.remat else Block
        for i in range(self.layers):
            x = block(self.heads, self.dtype, self.param_dtype, name=f"resblocks_{i}")(x, mask)
        return x


def attention_mask(text_mask) -> jax.Array:
    """[B, L] text mask -> [B, L + 4, L + 4] causal and key-padding mask (True = attend)."""
    b, length = text_mask.shape
    n = length + 4
    keys = jnp.concatenate([text_mask.astype(bool), jnp.ones((b, 4), bool)], axis=1)
    causal = jnp.tril(jnp.ones((n, n), bool))
    return causal[None] & keys[:, None, :]


class DiffusionPrior(nn.Module):
    """x_t [B, D] (scaled space), t [B] int (original-chain steps), cond -> predicted x_0 [B, D].

    cond: "text_emb" [B, D] (CLIP text embedding), "text_tokens" [B, L, Dt] (CLIP per-token text
    features), "text_mask" [B, L] bool (True = real token), and, with `learned_null`, optionally
    "null" [B] bool (True: replace the text conditioning by the learned null).
    """

    clip_dim: int = 768  # D: the CLIP embedding
    text_dim: int = 768  # Dt: per-token text features
    text_ctx: int = 77  # L
    width: int = 2048
    layers: int = 20
    heads: int = 32
    scaling: str = "standardize"
    scale: float = 17.2  # for scaling "l2"
    learned_null: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t, t, cond, train: bool = False):
        del train  # no dropout in either variant
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; expected one of {SCALINGS}")
        text_emb, tokens, mask = cond["text_emb"], cond["text_tokens"], cond["text_mask"]
        b = x_t.shape[0]
        if x_t.shape != (b, self.clip_dim) or text_emb.shape != (b, self.clip_dim):
            raise ValueError(f"expected x_t and text_emb of shape [B, {self.clip_dim}], got "
                             f"{x_t.shape} and {text_emb.shape}")  # fmt: skip
        if tokens.shape != (b, self.text_ctx, self.text_dim) or mask.shape != (b, self.text_ctx):
            raise ValueError(
                f"expected text_tokens [B, {self.text_ctx}, {self.text_dim}] and text_mask "
                f"[B, {self.text_ctx}], got {tokens.shape} and {mask.shape}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        f32 = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
        # Dataset statistics of the "standardize" scaling; not used here (the network works in
        # the scaled space) but stored with the weights, as in Karlo and diffusers.
        if self.scaling == "standardize":
            stat = (axes.JOINT_EMBED,)
            init = nn.with_logical_partitioning
            self.param("clip_mean", init(nn.initializers.zeros, stat), (self.clip_dim,),
                       self.param_dtype)  # fmt: skip
            self.param("clip_std", init(nn.initializers.ones, stat), (self.clip_dim,),
                       self.param_dtype)  # fmt: skip
        mask = mask.astype(bool)
        if self.learned_null:
            null_emb = self.param(
                "null_text_emb",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), (axes.JOINT_EMBED,)),
                (self.clip_dim,),
                self.param_dtype,
            )
            null = cond.get("null")
            if null is not None:
                null = null.astype(bool)
                text_emb = jnp.where(null[:, None], null_emb.astype(text_emb.dtype), text_emb)
                mask = mask & ~null[:, None]
        elif "null" in cond:
            raise ValueError("cond['null'] needs a prior with learned_null; without it the null "
                             "branch is the empty prompt's encoding")  # fmt: skip

        proj = (axes.JOINT_EMBED, axes.EMBED)
        text = dense(self.width, proj, name="text_enc_proj", **kw)(tokens.astype(self.dtype))
        emb = dense(self.width, proj, name="text_emb_proj", **kw)(text_emb.astype(self.dtype))
        # The timestep MLP runs in float32 (cos-first sinusoid, Linear, SiLU, Linear).
        temb = timestep_embedding(t, self.width)
        temb = dense(self.width, (axes.EMBED, axes.MLP), name="time_embed_0", **f32)(temb)
        temb = dense(self.width, (axes.MLP, axes.EMBED), name="time_embed_2", **f32)(silu(temb))
        img = dense(self.width, proj, name="clip_img_proj", **kw)(x_t.astype(self.dtype))
        normal = nn.initializers.normal(0.01)
        prd = self.param("prd_emb", nn.with_logical_partitioning(normal, (axes.EMBED,)),
                         (self.width,), self.param_dtype)  # fmt: skip
        pos = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(normal, (axes.LENGTH, axes.EMBED)),
            (self.text_ctx + 4, self.width),
            self.param_dtype,
        )
        extra = [emb, temb, img, jnp.broadcast_to(prd, (b, self.width))]
        x = jnp.concatenate(
            [text.astype(jnp.float32)] + [e.astype(jnp.float32)[:, None] for e in extra], axis=1
        )
        x = nn.with_logical_constraint(x + pos.astype(jnp.float32)[None], _ACTIVATION)

        x = Transformer(self.layers, self.heads, self.remat, name="transformer", **kw)(
            x, attention_mask(mask)
        )
        out = layer_norm(self.param_dtype, name="final_ln")(x[:, -1])
        out = dense(self.clip_dim, (axes.EMBED, axes.JOINT_EMBED), name="out_proj", **kw)(
            out.astype(self.dtype)
        )
        return out.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# The scaled embedding space.


def compute_embedding_stats(embeddings, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std [D] (float32) of CLIP image embeddings [N, D], in float64.

    The "standardize" scaling's statistics (Karlo's ViT-L-14_stats.th); std is floored at eps.
    """
    z = np.asarray(embeddings, np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"expected embeddings [N >= 2, D], got shape {z.shape}")
    return z.mean(0).astype(np.float32), np.maximum(z.std(0), eps).astype(np.float32)


def with_embedding_stats(params, mean, std):
    """params with `clip_mean`/`clip_std` replaced (a new dict; the input is not modified)."""
    if "clip_mean" not in params:
        raise ValueError("these params have no clip_mean/clip_std (scaling is not 'standardize')")
    out = dict(params)
    out["clip_mean"] = jnp.asarray(mean, params["clip_mean"].dtype).reshape(-1)
    out["clip_std"] = jnp.asarray(std, params["clip_std"].dtype).reshape(-1)
    return out


def scale_image_embedding(model: DiffusionPrior, params, z):
    """Raw CLIP image embeddings [B, D] -> the prior's diffusion space (no gradient to stats)."""
    z = jnp.asarray(z, jnp.float32)
    if model.scaling == "l2":
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12) * model.scale
    mean = jax.lax.stop_gradient(params["clip_mean"].astype(jnp.float32))
    std = jax.lax.stop_gradient(params["clip_std"].astype(jnp.float32))
    return (z - mean) / std


def unscale_image_embedding(model: DiffusionPrior, params, x):
    """The inverse: standardize -> x * std + mean (diffusers' post_process_latents); l2 -> x / s."""
    x = jnp.asarray(x, jnp.float32)
    if model.scaling == "l2":
        return x / model.scale
    return x * params["clip_std"].astype(jnp.float32) + params["clip_mean"].astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Builders.


def prior_from_config(model, *, dtype=jnp.float32, param_dtype=jnp.float32) -> DiffusionPrior:
    """A DiffusionPrior from a config's `model` section."""
    return DiffusionPrior(
        clip_dim=model.clip_dim,
        text_dim=model.text_dim,
        text_ctx=model.text_ctx,
        width=model.width,
        layers=model.layers,
        heads=model.heads,
        scaling=model.scaling,
        scale=model.get("scale", 17.2),
        learned_null=model.learned_null,
        remat=model.get("remat", False),
        dtype=dtype,
        param_dtype=param_dtype,
    )


def dummy_cond(model: DiffusionPrior, batch: int = 1, null: bool | None = None) -> dict:
    """Zero conditioning of the right shapes (for init and eval_shape); all tokens valid."""
    cond = {
        "text_emb": jnp.zeros((batch, model.clip_dim), jnp.float32),
        "text_tokens": jnp.zeros((batch, model.text_ctx, model.text_dim), jnp.float32),
        "text_mask": jnp.ones((batch, model.text_ctx), bool),
    }
    if model.learned_null if null is None else null:
        cond["null"] = jnp.zeros((batch,), bool)
    return cond


def init_params(model: DiffusionPrior, rng, batch: int = 1):
    """Boxed params (LogicallyPartitioned leaves) from zero inputs."""
    x = jnp.zeros((batch, model.clip_dim), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    return model.init(rng, x, t, dummy_cond(model, batch))["params"]


def count_params(model: DiffusionPrior) -> int:
    """The number of parameters, from shapes only (jax.eval_shape: nothing is allocated)."""
    shapes = jax.eval_shape(lambda rng: init_params(model, rng), jax.random.key(0))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.meta.unbox(shapes)))
