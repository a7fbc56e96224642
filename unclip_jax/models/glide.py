"""GLIDE's text-conditional UNets (SPEC 2.2-2.5): the text transformer feeding the ADM UNet.

The last context slot's output (position text_ctx - 1, a padding slot for short captions) is
projected by `transformer_proj` and added to the timestep embedding; all slots feed every attention
layer. Four input modes, as in glide-text2im:
  - "base":             x_t (3 channels)
  - "inpaint":          [x_t, image * mask, mask] (7)
  - "upsample":         [x_t, bilinear(low_res)] (6)
  - "upsample_inpaint": [x_t, image * mask, mask, bilinear(low_res)] (10)
mask = 1 on known pixels. Missing inpainting inputs default to zeros (nothing known).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models import axes
from unclip_jax.models.layers import Dtype, dense
from unclip_jax.models.text_transformer import TextTransformer
from unclip_jax.models.unet import UNet, resize_bilinear

MODES = {"base": 3, "inpaint": 7, "upsample": 6, "upsample_inpaint": 10}


class GlideUNet(nn.Module):
    """(x_t [B, H, W, 3], t [B], tokens [B, L], mask [B, L]) -> [B, H, W, out_channels]."""

    text: TextTransformer
    unet: UNet
    mode: str = "base"
    image_size: int = 64  # the resolution it samples at (from the config)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown GLIDE mode {self.mode!r}; expected one of {sorted(MODES)}")
        if self.unet.in_channels != MODES[self.mode]:
            raise ValueError(
                f"mode {self.mode!r} needs a UNet with {MODES[self.mode]} input channels, "
                f"got {self.unet.in_channels}"
            )
        self.transformer_proj = dense(
            self.unet.time_embed_dim,
            (axes.EMBED, axes.MLP),
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
        )

    def model_input(self, x, low_res=None, inpaint_image=None, inpaint_mask=None):
        """The UNet's input for this mode: x_t with the mode's extra channels concatenated."""
        parts = [x]
        if "inpaint" in self.mode:
            shape = x.shape[:-1]
            image = jnp.zeros(shape + (3,), x.dtype) if inpaint_image is None else inpaint_image
            mask = jnp.zeros(shape + (1,), x.dtype) if inpaint_mask is None else inpaint_mask
            if image.shape != shape + (3,) or mask.shape != shape + (1,):
                raise ValueError(
                    f"inpainting needs image {shape + (3,)} and mask {shape + (1,)}, got "
                    f"{image.shape} and {mask.shape}"
                )
            parts += [image * mask, mask]
        if "upsample" in self.mode:
            if low_res is None:
                raise ValueError(f"mode {self.mode!r} needs the low-resolution image")
            parts.append(resize_bilinear(low_res, x.shape[1], x.shape[2]).astype(x.dtype))
        return jnp.concatenate(parts, axis=-1)

    def __call__(
        self,
        x,
        timesteps,
        tokens,
        mask,
        *,
        low_res=None,
        inpaint_image=None,
        inpaint_mask=None,
        train: bool = False,
    ):
        xf_out = self.text(tokens, mask)
        emb = self.transformer_proj(xf_out[:, -1].astype(jnp.float32))
        h = self.model_input(x, low_res, inpaint_image, inpaint_mask)
        return self.unet(h, timesteps, emb=emb, encoder_out=xf_out, train=train)


def attention_ds(image_size: int, resolutions: str | tuple[int, ...]) -> tuple[int, ...]:
    """'32,16,8' at image_size 64 -> downsample factors (2, 4, 8), as ADM converts them."""
    if isinstance(resolutions, str):
        resolutions = tuple(int(r) for r in resolutions.split(",") if r.strip())
    for r in resolutions:
        if image_size % r:
            raise ValueError(f"attention resolution {r} does not divide image size {image_size}")
    return tuple(image_size // r for r in resolutions)


def unet_from_config(c, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=None) -> UNet:
    """A UNet from a config's `model.unet` section."""
    return UNet(
        in_channels=c.in_channels,
        model_channels=c.model_channels,
        out_channels=c.out_channels,
        num_res_blocks=c.num_res_blocks,
        attention_ds=attention_ds(c.image_size, c.attention_resolutions),
        channel_mult=tuple(c.channel_mult),
        num_head_channels=c.num_head_channels,
        dropout=c.dropout,
        use_scale_shift_norm=c.use_scale_shift_norm,
        resblock_updown=c.resblock_updown,
        middle_attention=c.get("middle_attention", True),
        remat=c.get("remat", False) if remat is None else remat,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def glide_from_config(model, *, dtype=jnp.float32, param_dtype=jnp.float32) -> GlideUNet:
    """A GlideUNet from a config's `model` section (`text`, `unet` and `mode`)."""
    t = model.text
    text = TextTransformer(
        vocab_size=t.vocab_size,
        text_ctx=t.text_ctx,
        width=t.width,
        layers=t.layers,
        heads=t.heads,
        final_ln=t.final_ln,
        padding_embedding=t.padding_embedding,
        remat=model.get("remat", False),
        dtype=dtype,
        param_dtype=param_dtype,
    )
    unet = unet_from_config(model.unet, dtype=dtype, param_dtype=param_dtype,
                            remat=model.get("remat", False))  # fmt: skip
    return GlideUNet(text, unet, model.mode, model.unet.image_size, dtype=dtype,
                     param_dtype=param_dtype)  # fmt: skip
