"""The ADM/GLIDE UNet (Dhariwal & Nichol; Nichol et al.), one configurable module for the family.

GLIDE's base, inpainting and upsampling models, the unCLIP decoder and the attention-free unCLIP
upsamplers are all this network with different settings (SPEC 2.1). NHWC throughout.

Parameter names follow the original checkpoints, with '.' between indices written '_':
`input_blocks.4.1.qkv` is `input_blocks_4_1/qkv`, so converters are name maps.
  - time_embed_0/2: the timestep MLP (float32, as GLIDE keeps it);
  - input_blocks_{i}_{j}, middle_block_{j}, output_blocks_{i}_{j}: j = 0 the ResBlock, then the
    attention block (if any), then the resampling ResBlock (if any);
  - out_0 (GroupNorm) and out_2 (zero-initialised conv).
Attention blocks take encoder tokens (text, CLIP tokens) as extra keys and values placed BEFORE the
spatial tokens, with an optional key-padding mask over the encoder tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import axes
from unclip_jax.models.layers import (
    Dtype,
    GroupNorm32,
    attention,
    conv,
    dense,
    silu,
    timestep_embedding,
)

_ACTIVATION = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.CHANNELS)


def _constrain(h):
    return nn.with_logical_constraint(h, _ACTIVATION)


def upsample_nearest(x):
    """[B, H, W, C] -> [B, 2H, 2W, C] by repeating pixels."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x):
    """[B, H, W, C] -> [B, H/2, W/2, C] by 2x2 average pooling."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """GN-SiLU-(resample)-conv, then the timestep embedding (scale-shift or added), GN-SiLU-conv."""

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    up: bool = False
    down: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = silu(GroupNorm32(param_dtype=self.param_dtype, name="in_layers_0")(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_avg(h), downsample_avg(x)
        h = conv(self.out_channels, 3, name="in_layers_2", **kw)(h)
        width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = dense(width, (axes.EMBED, axes.CONV_OUT), name="emb_layers_1", **kw)(silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        out_norm = GroupNorm32(param_dtype=self.param_dtype, name="out_layers_0")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(silu(h))
        h = conv(self.out_channels, 3, zero_init=True, name="out_layers_3", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="skip_connection", **kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels, with encoder tokens prepended to keys and values.

    qkv is one projection laid out per head as [q | k | v] (GLIDE's order), encoder_kv per head as
    [k | v]. `encoder_out` [B, S, E], `encoder_mask` [B, S] (True = attend).
    """

    num_head_channels: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, encoder_out=None, encoder_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, c = x.shape
        if c % self.num_head_channels:
            raise ValueError(f"{c} channels do not split into heads of {self.num_head_channels}")
        heads, ch = c // self.num_head_channels, self.num_head_channels
        h = GroupNorm32(param_dtype=self.param_dtype, name="norm")(x).reshape(b, height * width, c)
        qkv = dense(3 * c, (axes.EMBED, axes.HEADS), name="qkv", **kw)(h)
        q, k, v = jnp.split(qkv.reshape(b, height * width, heads, 3 * ch), 3, axis=-1)
        mask = None
        if encoder_out is not None:
            ekv = dense(2 * c, (axes.EMBED, axes.HEADS), name="encoder_kv", **kw)(encoder_out)
            ek, ev = jnp.split(ekv.reshape(b, encoder_out.shape[1], heads, 2 * ch), 2, axis=-1)
            k, v = jnp.concatenate([ek, k], axis=1), jnp.concatenate([ev, v], axis=1)
            if encoder_mask is not None:
                mask = jnp.concatenate(
                    [encoder_mask.astype(bool), jnp.ones((b, height * width), bool)], axis=1
                )
        out = attention(q, k, v, mask).reshape(b, height * width, c)
        out = dense(c, (axes.HEADS, axes.EMBED), zero_init=True, name="proj_out", **kw)(out)
        return x + out.reshape(b, height, width, c).astype(x.dtype)


class UNet(nn.Module):
    """The ADM UNet: (x_t [B, H, W, in], t [B]) -> [B, H, W, out].

    attention_ds: downsample factors (image_size // resolution) at which attention blocks sit.
    encoder_channels: width of encoder tokens (None: attention blocks attend to pixels only).
    Conditioning enters through `emb` (added to the timestep embedding; [B, 4 * model_channels])
    and `encoder_out` / `encoder_mask` (fed to every attention block, the middle one included).
    """

    in_channels: int = 3
    model_channels: int = 192
    out_channels: int = 6
    num_res_blocks: int = 3
    attention_ds: tuple[int, ...] = (2, 4, 8)
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_head_channels: int = 64
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    middle_attention: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @nn.compact
    def __call__(self, x, timesteps, *, emb=None, encoder_out=None, encoder_mask=None, train=False):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, H, W, {self.in_channels}], got {x.shape}")
        levels = len(self.channel_mult)
        if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(f"image size {x.shape[1:3]} must be divisible by {2 ** (levels - 1)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res_cls = nn.remat(ResBlock) if self.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock

        def res(out_channels, name, **extra):
            return res_cls(
                out_channels,
                dropout=self.dropout,
                use_scale_shift_norm=self.use_scale_shift_norm,
                deterministic=not train,
                name=name,
                **extra,
                **kw,
            )

        def attn(h, name):
            block = attn_cls(self.num_head_channels, name=name, **kw)
            return _constrain(block(h, encoder_out, encoder_mask))

        # The timestep MLP runs in float32 (as GLIDE's); conditioning embeddings are added to it.
        temb = timestep_embedding(timesteps, self.model_channels)
        f32 = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
        temb = dense(self.time_embed_dim, (axes.EMBED, axes.MLP), name="time_embed_0", **f32)(temb)
        temb = dense(self.time_embed_dim, (axes.MLP, axes.EMBED), name="time_embed_2", **f32)(
            silu(temb)
        )
        if emb is not None:
            temb = temb + emb.astype(jnp.float32)

        h = conv(self.channel_mult[0] * self.model_channels, 3, name="input_blocks_0_0", **kw)(
            x.astype(self.dtype)
        )
        skips, ds, index = [h], 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = _constrain(res(mult * self.model_channels, f"input_blocks_{index}_0")(h, temb))
                if ds in self.attention_ds:
                    h = attn(h, f"input_blocks_{index}_1")
                skips.append(h)
                index += 1
            if level != levels - 1:
                name = f"input_blocks_{index}_0"
                if self.resblock_updown:
                    h = res(h.shape[-1], name, down=True)(h, temb)
                else:
                    h = conv(h.shape[-1], 3, strides=2, name=name, **kw)(h)
                skips.append(_constrain(h))
                ds, index = ds * 2, index + 1

        h = _constrain(res(h.shape[-1], "middle_block_0")(h, temb))
        if self.middle_attention:
            h = attn(h, "middle_block_1")
        h = _constrain(res(h.shape[-1], "middle_block_2")(h, temb))

        index = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = _constrain(res(mult * self.model_channels, f"output_blocks_{index}_0")(h, temb))
                j = 1
                if ds in self.attention_ds:
                    h = attn(h, f"output_blocks_{index}_{j}")
                    j += 1
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{index}_{j}"
                    if self.resblock_updown:
                        h = res(h.shape[-1], name, up=True)(h, temb)
                    else:
                        h = conv(h.shape[-1], 3, name=name, **kw)(upsample_nearest(h))
                    h = _constrain(h)
                    ds //= 2
                index += 1

        h = silu(GroupNorm32(param_dtype=self.param_dtype, name="out_0")(h))
        out = conv(self.out_channels, 3, zero_init=True, name="out_2", **kw)(h)
        return out.astype(jnp.float32)


def resize_bilinear(image, height: int, width: int):
    """Bilinear resize of [B, h, w, C] to [B, height, width, C] (torch's align_corners=False)."""
    return jax.image.resize(
        image, (image.shape[0], height, width, image.shape[-1]), "bilinear", antialias=False
    )
