"""unCLIP's image stages (SPEC 3.4, 3.5, 4.3-4.5): the 64x64 decoder and the attention-free
upsamplers, both built on the ADM UNet of `models/unet.py`.

The decoder conditions a GLIDE-style UNet on a CLIP image embedding `z_i` twice:
  - `clip_emb(z_i)` is added to the timestep embedding;
  - `clip_tok_proj(z_i)` becomes 4 extra context tokens placed AHEAD of the text tokens. The
    projection's output is read channel-major, [C, 4] (Karlo's `reshape(B, C, 4)`), so that Karlo
    and diffusers weights load as they are (SPEC 6).
Its text pathway is one of
  - "glide" (the paper): GLIDE's own text transformer over token ids; `transformer_proj` of its
    last context slot joins the timestep embedding, all its slots follow the CLIP tokens. No
    attention mask, as in GLIDE.
  - "clip" (Karlo): frozen CLIP text features from outside: `text_feat_proj` of the CLIP text
    embedding joins the timestep embedding, `text_seq_proj` (Linear + LayerNorm) of the per-token
    features follows the CLIP tokens; padded text tokens are masked out of attention.
`cf_param` is the learned null image embedding of classifier-free guidance: it replaces z_i where
`cond["drop_image"]` is True (during training at the image-drop rate, and in the null branch).

The upsamplers are the UNet with 6 input channels: x_t and the low-resolution image resized to
x_t's size (bicubic by default, which equals torch's bicubic with antialias, the resize Karlo and
diffusers do outside their model), eps prediction, no text, no attention.

Conditioning is a dict of batch-first arrays (so the samplers can concatenate [cond; null]):
  decoder, both pathways:  image_emb [B, clip_dim] float, drop_image [B] bool (optional)
  decoder, "glide":        tokens [B, text_ctx] int, mask [B, text_ctx] bool
  decoder, "clip":         text_emb [B, clip_dim] (CLIP's text embedding), text_tokens
                           [B, L, text_dim] (its final-LayerNorm token features), text_mask [B, L]
  upsampler:               low_res [B, h, w, 3] in [-1, 1] (any h, w; resized to x_t's size)
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import axes
from unclip_jax.models.glide import unet_from_config
from unclip_jax.models.layers import Dtype, dense, layer_norm
from unclip_jax.models.text_transformer import TextTransformer
from unclip_jax.models.unet import UNet

PATHWAYS = ("glide", "clip")


class UnclipDecoder(nn.Module):
    """(x_t [B, H, W, 3], t [B], cond) -> [B, H, W, unet.out_channels] (eps and learned variance).

    unet: the ADM UNet; its attention blocks receive the context tokens (width encoder_channels).
    text: GLIDE's text transformer ("glide" pathway, the paper) or None ("clip" pathway, Karlo).
    """

    unet: UNet
    clip_dim: int = 768
    clip_tokens: int = 4
    encoder_channels: int = 1536
    text: TextTransformer | None = None
    text_dim: int = 768  # width of CLIP's text token features ("clip" pathway; Karlo: 768)
    image_size: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def pathway(self) -> str:
        return "clip" if self.text is None else "glide"

    def setup(self):
        if self.text is not None and self.text.width != self.encoder_channels:
            raise ValueError(f"the text transformer's width {self.text.width} must equal "
                             f"encoder_channels {self.encoder_channels}")  # fmt: skip
        f32 = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
        names = (axes.JOINT_EMBED, axes.EMBED)
        temb = self.unet.time_embed_dim
        self.cf_param = self.param(
            "cf_param",
            nn.with_logical_partitioning(nn.initializers.zeros, (axes.JOINT_EMBED,)),
            (self.clip_dim,),
            self.param_dtype,
        )
        self.clip_emb = dense(temb, names, **f32)
        self.clip_tok_proj = dense(self.clip_tokens * self.encoder_channels, names, **f32)
        if self.text is None:
            self.text_feat_proj = dense(temb, names, **f32)
            self.text_seq_proj_0 = dense(self.encoder_channels, names, **f32)
            self.text_seq_proj_1 = layer_norm(self.param_dtype)
        else:
            self.transformer_proj = dense(temb, (axes.EMBED, axes.MLP), **f32)

    def image_embedding(self, cond):
        """z_i [B, clip_dim] with the learned null embedding where cond["drop_image"] is True."""
        z = cond["image_emb"].astype(jnp.float32)
        if z.ndim != 2 or z.shape[1] != self.clip_dim:
            raise ValueError(f"expected image_emb of shape [B, {self.clip_dim}], got {z.shape}")
        drop = cond.get("drop_image")
        if drop is not None:
            z = jnp.where(drop[:, None], self.cf_param.astype(jnp.float32)[None], z)
        return z

    def conditioning(self, cond):
        """(emb [B, 4 * model_channels] float32, context [B, 4 + L, E], mask [B, 4 + L] or None).

        emb is added to the timestep embedding; context and mask go to every attention block.
        """
        z = self.image_embedding(cond)
        b = z.shape[0]
        emb = self.clip_emb(z)
        # Channel-major: token j of the 4 is out[:, c * 4 + j] (Karlo's reshape(B, C, 4)).
        clip_tokens = self.clip_tok_proj(z).reshape(b, self.encoder_channels, self.clip_tokens)
        clip_tokens = jnp.swapaxes(clip_tokens, 1, 2)
        if self.text is None:
            emb = emb + self.text_feat_proj(cond["text_emb"].astype(jnp.float32))
            feats = cond["text_tokens"].astype(jnp.float32)
            text_tokens = self.text_seq_proj_1(self.text_seq_proj_0(feats))
            mask = jnp.concatenate(
                [jnp.ones((b, self.clip_tokens), bool), cond["text_mask"].astype(bool)], axis=1
            )
        else:
            xf_out = self.text(cond["tokens"], cond["mask"])
            emb = emb + self.transformer_proj(xf_out[:, -1].astype(jnp.float32))
            text_tokens, mask = xf_out, None  # GLIDE attends over padding too
        context = jnp.concatenate(
            [clip_tokens.astype(self.dtype), text_tokens.astype(self.dtype)], axis=1
        )
        context = nn.with_logical_constraint(context, (axes.BATCH, axes.LENGTH, axes.EMBED))
        return emb, context, mask

    def __call__(self, x, timesteps, cond, train: bool = False):
        emb, context, mask = self.conditioning(cond)
        return self.unet(x, timesteps, emb=emb, encoder_out=context, encoder_mask=mask, train=train)


class UnclipUpsampler(nn.Module):
    """(x_t [B, H, W, 3], t [B], {"low_res": [B, h, w, 3]}) -> [B, H, W, unet.out_channels].

    The low-resolution image is resized to H x W (`resize`: a jax.image.resize method; "bicubic"
    matches torch's bicubic + antialias, Karlo's choice) and concatenated after x_t.
    """

    unet: UNet
    resize: str = "bicubic"
    image_size: int = 256  # the resolution it samples at; training crops are smaller
    low_res_size: int = 64

    @nn.compact
    def __call__(self, x, timesteps, cond, train: bool = False):
        if self.unet.in_channels != 2 * x.shape[-1]:
            raise ValueError(f"an upsampler's UNet needs {2 * x.shape[-1]} input channels, has "
                             f"{self.unet.in_channels}")  # fmt: skip
        low = cond["low_res"].astype(jnp.float32)
        if low.shape[1:3] != x.shape[1:3]:
            low = jax.image.resize(low, x.shape[:3] + (low.shape[-1],), self.resize)
        return self.unet(jnp.concatenate([x, low.astype(x.dtype)], axis=-1), timesteps,
                         train=train)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Builders, sampler callables and the null conditioning of classifier-free guidance.


def decoder_from_config(model, *, dtype=jnp.float32, param_dtype=jnp.float32) -> UnclipDecoder:
    """An UnclipDecoder from a config's `model` section (see configs/decoder64.py)."""
    if model.text_pathway not in PATHWAYS:
        raise ValueError(f"unknown text_pathway {model.text_pathway!r}; expected one of {PATHWAYS}")
    remat = model.get("remat", False)
    unet = unet_from_config(model.unet, dtype=dtype, param_dtype=param_dtype, remat=remat)
    text = None
    if model.text_pathway == "glide":
        t = model.text
        text = TextTransformer(vocab_size=t.vocab_size, text_ctx=t.text_ctx, width=t.width,
                               layers=t.layers, heads=t.heads, final_ln=t.final_ln,
                               padding_embedding=t.padding_embedding, remat=remat, dtype=dtype,
                               param_dtype=param_dtype)  # fmt: skip
    return UnclipDecoder(unet, clip_dim=model.clip_dim, clip_tokens=model.clip_tokens,
                         encoder_channels=model.encoder_channels, text=text,
                         text_dim=model.get("text_dim", model.clip_dim),
                         image_size=model.unet.image_size, dtype=dtype,
                         param_dtype=param_dtype)  # fmt: skip


def upsampler_from_config(model, *, dtype=jnp.float32, param_dtype=jnp.float32) -> UnclipUpsampler:
    """An UnclipUpsampler from a config's `model` section (see configs/upsample256.py)."""
    unet = unet_from_config(model.unet, dtype=dtype, param_dtype=param_dtype,
                            remat=model.get("remat", False))  # fmt: skip
    return UnclipUpsampler(unet, resize=model.get("resize", "bicubic"),
                           image_size=model.unet.image_size,
                           low_res_size=model.low_res_size)  # fmt: skip


def example_cond(model, batch: int = 1, *, text_ctx: int | None = None) -> dict:
    """Zero conditioning of the right structure (for init and eval_shape)."""
    if isinstance(model, UnclipUpsampler):
        return {"low_res": jnp.zeros((batch, model.low_res_size, model.low_res_size, 3))}
    cond = {
        "image_emb": jnp.zeros((batch, model.clip_dim)),
        "drop_image": jnp.zeros((batch,), bool),
    }
    if model.text is not None:
        ctx = model.text.text_ctx
        cond |= {"tokens": jnp.zeros((batch, ctx), jnp.int32), "mask": jnp.ones((batch, ctx), bool)}
    else:
        ctx = text_ctx or 77
        cond |= {"text_emb": jnp.zeros((batch, model.clip_dim)),
                 "text_tokens": jnp.zeros((batch, ctx, model.text_dim)),
                 "text_mask": jnp.ones((batch, ctx), bool)}  # fmt: skip
    return cond


def init_params(model, rng, batch: int = 1, **kw):
    """Boxed params of a decoder or upsampler (wrap in jax.eval_shape for shapes only)."""
    size = model.image_size
    x = jnp.zeros((batch, size, size, 3))
    return model.init(rng, x, jnp.zeros((batch,), jnp.int32), example_cond(model, batch, **kw))[
        "params"
    ]


def make_model_fn(model) -> Callable:
    """The samplers' model_fn(params, x, t_model, cond) -> output for a decoder or upsampler.

    Build it once per model and reuse the same object: samplers take it as a static argument.
    """

    def model_fn(params, x, t, cond):
        return model.apply({"params": params}, x, t, cond)

    return model_fn


def null_cond(cond: dict, *, pad_id: int | None = None, null_text: dict | None = None) -> dict:
    """The classifier-free-guidance null branch for `cond`: image dropped and an empty caption.

    "glide" pathway: tokens all `pad_id`, mask all False (GLIDE's empty caption). "clip" pathway:
    `null_text` holds the CLIP features of the empty prompt, unbatched ({"text_emb" [D],
    "text_tokens" [L, D], "text_mask" [L]}), as Karlo and diffusers feed them.
    """
    b = cond["image_emb"].shape[0]
    out = dict(cond, drop_image=jnp.ones((b,), bool))
    if "tokens" in cond:
        if pad_id is None:
            raise ValueError("the glide text pathway's null caption needs pad_id")
        out["tokens"] = jnp.full_like(cond["tokens"], pad_id)
        out["mask"] = jnp.zeros_like(cond["mask"], bool)
    else:
        if null_text is None:
            raise ValueError("the clip text pathway's null caption needs null_text (CLIP "
                             "features of the empty prompt)")  # fmt: skip
        for key in ("text_emb", "text_tokens", "text_mask"):
            value = jnp.asarray(null_text[key])
            out[key] = jnp.broadcast_to(value[None], (b,) + value.shape).astype(cond[key].dtype)
    return out
