"""GLIDE's text transformer (SPEC 2.2): token + positional embeddings, learned embeddings in padded
slots, pre-LN residual blocks with no mask, a final LayerNorm. [B, L] tokens -> [B, L, W].

Names follow glide-text2im: token_embedding, positional_embedding, padding_embedding,
transformer/resblocks_{i}/{ln_1, attn/c_qkv, attn/c_proj, ln_2, mlp/c_fc, mlp/c_proj}, final_ln.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models import axes
from unclip_jax.models.layers import Dtype, attention, dense, layer_norm

_ACTIVATION = (axes.BATCH, axes.LENGTH, axes.EMBED)


class MultiheadAttention(nn.Module):
    """Unmasked self-attention with one c_qkv projection laid out per head as [q | k | v]."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, length, width = x.shape
        qkv = dense(3 * width, (axes.EMBED, axes.HEADS), name="c_qkv", **kw)(x)
        q, k, v = jnp.split(qkv.reshape(b, length, self.heads, -1), 3, axis=-1)
        out = attention(q, k, v).reshape(b, length, width)
        return dense(width, (axes.HEADS, axes.EMBED), name="c_proj", **kw)(out)


class MLP(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(4 * x.shape[-1], (axes.EMBED, axes.MLP), name="c_fc", **kw)(x)
        h = nn.gelu(h, approximate=False)
        return dense(x.shape[-1], (axes.MLP, axes.EMBED), name="c_proj", **kw)(h)


class ResidualAttentionBlock(nn.Module):
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + MultiheadAttention(self.heads, name="attn", **kw)(
            layer_norm(self.param_dtype, name="ln_1")(x).astype(self.dtype)
        )
        x = x + MLP(name="mlp", **kw)(
            layer_norm(self.param_dtype, name="ln_2")(x).astype(self.dtype)
        )
        return nn.with_logical_constraint(x, _ACTIVATION)


class Transformer(nn.Module):
    layers: int
    heads: int
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        for i in range(self.layers):
            x = block(self.heads, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"resblocks_{i}")(x)  # fmt: skip
        return x


class TextTransformer(nn.Module):
    """tokens [B, L] int, mask [B, L] bool (True = real token) -> [B, L, width].

    With `padding_embedding`, padded slots are replaced entirely by a learned per-position vector;
    attention itself is unmasked (GLIDE attends over padding).
    """

    vocab_size: int = 50257
    text_ctx: int = 128
    width: int = 512
    layers: int = 16
    heads: int = 8
    final_ln: bool = True
    padding_embedding: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, mask):
        if tokens.ndim != 2 or tokens.shape[1] != self.text_ctx or tokens.shape != mask.shape:
            raise ValueError(
                f"expected tokens and mask of shape [B, {self.text_ctx}], got {tokens.shape} and "
                f"{mask.shape}"
            )
        init = nn.initializers.normal(0.01)
        xf = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(init, (axes.VOCAB, axes.EMBED)),
            name="token_embedding",
        )(tokens)
        pos = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(init, (axes.LENGTH, axes.EMBED)),
            (self.text_ctx, self.width),
            self.param_dtype,
        )
        xf = xf + pos.astype(self.dtype)[None]
        if self.padding_embedding:
            pad = self.param(
                "padding_embedding",
                nn.with_logical_partitioning(init, (axes.LENGTH, axes.EMBED)),
                (self.text_ctx, self.width),
                self.param_dtype,
            )
            xf = jnp.where(mask[..., None], xf, pad.astype(self.dtype)[None])
        xf = Transformer(self.layers, self.heads, self.remat, self.dtype, self.param_dtype,
                         name="transformer")(xf)  # fmt: skip
        if self.final_ln:
            xf = layer_norm(self.param_dtype, name="final_ln")(xf)
        return xf.astype(self.dtype)
