"""CLIP in Flax linen: the ViT image tower, the causal text tower, projections and the logit scale.

One module, `CLIP`, covers transformers' three classes through its config: both towers
(`CLIPModel`), the text tower only (`CLIPTextModelWithProjection`, `vision=None`) or the image tower
only (`CLIPVisionModelWithProjection`, `text=None`). Parameter names mirror transformers'
(`text_model.encoder.layers_0.self_attn.q_proj`, `vision_model.embeddings.class_embedding`, ...).

The noise-aware image tower of GLIDE (SPEC 2.6) is the same ViT with `vision.num_timesteps` set: a
learned timestep embedding w_t[t] takes the class-token slot, and with `vision.normalize_input` the
tower takes images in [-1, 1] (x_t of the diffusion) and applies CLIP's pixel normalisation itself,
so that guidance gradients reach x_t.

Shapes: token ids [B, L] int32; images NHWC [B, H, W, C]; per-token states [B, L, D].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from unclip_jax.models import axes
from unclip_jax.models.clip_layers import (
    ACTIVATIONS,
    Encoder,
    causal_mask,
    normal_init,
    padding_mask,
)
from unclip_jax.models.layers import layer_norm

Dtype = Any

# OpenAI CLIP's pixel statistics on the [0, 1] scale (x 255 = SPEC 2.6's numbers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The causal text tower (transformers' CLIPTextConfig)."""

    vocab_size: int = 49408
    context_length: int = 77  # max_position_embeddings
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    # Where the pooled (end-of-text) state is read when the caller gives no eot_positions:
    # "first_eos" = the first eos_token_id (transformers' rule); "argmax" = the largest id, as in
    # OpenAI's code and old checkpoints whose config says eos_token_id = 2.
    eot_pooling: str = "first_eos"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT image tower (transformers' CLIPVisionConfig), plus the noise-aware options."""

    image_size: int = 224
    patch_size: int = 32
    channels: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_timesteps: int | None = None  # set: noise-aware tower, w_t[t] in the class-token slot
    normalize_input: bool = False  # True: inputs in [-1, 1], CLIP-normalised inside the tower

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _check(cfg: TextConfig | VisionConfig) -> None:
    if cfg.width % cfg.heads:
        raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {cfg.activation!r}; one of {sorted(ACTIVATIONS)}")
    if isinstance(cfg, VisionConfig) and cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of {cfg.patch_size}")
    if isinstance(cfg, TextConfig) and cfg.eot_pooling not in ("first_eos", "argmax"):
        raise ValueError(f"eot_pooling must be 'first_eos' or 'argmax', got {cfg.eot_pooling!r}")


@struct.dataclass
class CLIPOutput:
    """What a CLIP forward pass returns; fields of an absent tower are None.

    text_embeds / image_embeds [B, E]: projected pooled states, NOT normalised (as transformers'
        *WithProjection models and Karlo use them); `l2_normalize` them for similarities.
    text_hidden_states [B, L, Dt]: per-token states after the final LayerNorm (unCLIP's decoder
        and prior consume these). image_hidden_states [B, 1 + N, Dv]: per-token states before the
        post-LayerNorm (transformers' last_hidden_state).
    text_pooled / image_pooled [B, D]: the states at the end-of-text token / class slot, normed.
    logit_scale []: exp(learned log-scale) clamped at max_logit_scale (models with both towers).
    logits_per_text [Bt, Bi] = logit_scale * normalised text . normalised image; logits_per_image
        is its transpose. Present when both inputs were given.
    """

    text_embeds: jax.Array | None = None
    image_embeds: jax.Array | None = None
    text_hidden_states: jax.Array | None = None
    image_hidden_states: jax.Array | None = None
    text_pooled: jax.Array | None = None
    image_pooled: jax.Array | None = None
    logit_scale: jax.Array | None = None
    logits_per_text: jax.Array | None = None
    logits_per_image: jax.Array | None = None


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| over the last axis, in float32 (eps as in GLIDE's noised CLIP)."""
    x = x.astype(jnp.float32)
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def eot_positions_from_ids(input_ids: jax.Array, cfg: TextConfig) -> jax.Array:
    """[B] index of the end-of-text token of each row of input_ids [B, L] (see TextConfig)."""
    if cfg.eot_pooling == "argmax":
        return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
    # argmax of a bool row is its first True: the first eos, even when padding is eos too.
    return jnp.argmax(input_ids == cfg.eos_token_id, axis=-1).astype(jnp.int32)


class TextEmbeddings(nn.Module):
    """Token + learned positional embeddings. ids [B, L] -> [B, L, D] float32."""

    cfg: TextConfig
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.cfg
        kw = dict(features=cfg.width, dtype=jnp.float32, param_dtype=self.param_dtype)
        tokens = nn.Embed(
            cfg.vocab_size,
            embedding_init=normal_init(0.02, (axes.VOCAB, axes.EMBED)),
            name="token_embedding",
            **kw,
        )(input_ids)
        positions = nn.Embed(
            cfg.context_length,
            embedding_init=normal_init(0.01, (axes.LENGTH, axes.EMBED)),
            name="position_embedding",
            **kw,
        )(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class TextTransformer(nn.Module):
    """The text tower: embeddings, causal encoder, final LayerNorm, end-of-text pooling.

    input_ids [B, L] (L <= context_length); attention_mask [B, L] (1 = real token) optionally
    masks padded keys on top of the causal mask; eot_positions [B] overrides the pooling index.
    Returns (per-token states [B, L, D], pooled [B, D]), float32.
    """

    cfg: TextConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, eot_positions=None):
        cfg = self.cfg
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if length > cfg.context_length:
            raise ValueError(f"{length} tokens exceed the context length {cfg.context_length}")
        x = TextEmbeddings(cfg, self.param_dtype, name="embeddings")(input_ids)
        mask = causal_mask(length)
        if attention_mask is not None:
            mask = mask & padding_mask(attention_mask)
        x = Encoder(
            cfg.layers,
            cfg.heads,
            cfg.mlp_dim,
            cfg.activation,
            cfg.layer_norm_eps,
            self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="encoder",
        )(x, mask)
        x = layer_norm(self.param_dtype, cfg.layer_norm_eps, name="final_layer_norm")(x)
        if eot_positions is None:
            eot_positions = eot_positions_from_ids(input_ids, cfg)
        pooled = jnp.take_along_axis(x, eot_positions.astype(jnp.int32)[:, None, None], axis=1)
        return x, pooled[:, 0]


class VisionEmbeddings(nn.Module):
    """Patch convolution (no bias) + class token (or timestep embedding) + positions.

    images [B, H, W, C] -> [B, 1 + N, D] float32; t [B] int for the noise-aware tower.
    """

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, t: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        p, d = cfg.patch_size, cfg.width
        patches = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal_init(0.02, (None, None, axes.CONV_IN, axes.EMBED)),
            name="patch_embedding",
        )(images.astype(self.dtype))
        batch = images.shape[0]
        patches = patches.reshape(batch, -1, d).astype(jnp.float32)  # row-major, as torch flatten
        if cfg.num_timesteps is None:
            cls = self.param(
                "class_embedding",
                normal_init(d**-0.5, (axes.EMBED,)),
                (d,),
                self.param_dtype,
            )
            first = jnp.broadcast_to(cls.astype(jnp.float32), (batch, 1, d))
        else:
            # GLIDE's noised CLIP: a learned embedding of the (original-chain) timestep replaces
            # the class token, so every layer can condition on the noise level.
            first = nn.Embed(
                cfg.num_timesteps,
                d,
                dtype=jnp.float32,
                param_dtype=self.param_dtype,
                embedding_init=normal_init(d**-0.5, (axes.TIMESTEPS, axes.EMBED)),
                name="timestep_embedding",
            )(t.astype(jnp.int32))[:, None]
        positions = nn.Embed(
            cfg.num_patches + 1,
            d,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            embedding_init=normal_init(0.02, (axes.LENGTH, axes.EMBED)),
            name="position_embedding",
        )(jnp.arange(cfg.num_patches + 1))
        return jnp.concatenate([first, patches], axis=1) + positions[None]


class VisionTransformer(nn.Module):
    """The image tower: embeddings, pre-LayerNorm, encoder, post-LayerNorm on the class slot.

    images [B, H, W, C] (already normalised, or in [-1, 1] with cfg.normalize_input);
    t [B] int32 original-chain timesteps for the noise-aware tower.
    Returns (per-token states [B, 1 + N, D] before the post-LN, pooled [B, D]), float32.
    """

    cfg: VisionConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, t: jax.Array | None = None):
        cfg = self.cfg
        expected = (cfg.image_size, cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be NHWC [B, {', '.join(map(str, expected))}], "
                             f"got shape {images.shape}")  # fmt: skip
        if (cfg.num_timesteps is None) != (t is None):
            need = "needs timesteps t" if t is None else "takes no timesteps"
            raise ValueError(f"this image tower {need} (vision.num_timesteps={cfg.num_timesteps})")
        if t is not None and t.shape != (images.shape[0],):
            raise ValueError(f"timesteps must be [B] = [{images.shape[0]}], got {t.shape}")
        if cfg.normalize_input:
            images = normalize_images(images, value_range=(-1.0, 1.0))
        x = VisionEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(images, t)
        # transformers spells it "pre_layrnorm"; the converter maps the name.
        x = layer_norm(self.param_dtype, cfg.layer_norm_eps, name="pre_layernorm")(x)
        x = Encoder(
            cfg.layers,
            cfg.heads,
            cfg.mlp_dim,
            cfg.activation,
            cfg.layer_norm_eps,
            self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="encoder",
        )(x)
        pooled = layer_norm(self.param_dtype, cfg.layer_norm_eps, name="post_layernorm")(x[:, 0])
        return x, pooled


class CLIP(nn.Module):
    """CLIP with either tower optional (see the module docstring).

    __call__(input_ids [B, L] | None, images NHWC | None, *, timesteps [B], attention_mask [B, L],
    eot_positions [B]) -> CLIPOutput. Each tower runs only when its input is given, so a two-tower
    model can embed text alone (`CLIP.apply(params, ids)`); init with both inputs.
    """

    text: TextConfig | None = TextConfig()
    vision: VisionConfig | None = VisionConfig()
    projection_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    learn_logit_scale: bool = True  # False: fixed (GLIDE's noised CLIP keeps log 100)
    max_logit_scale: float = 100.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array | None = None,
        images: jax.Array | None = None,
        *,
        timesteps: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        eot_positions: jax.Array | None = None,
    ) -> CLIPOutput:
        if self.text is None and self.vision is None:
            raise ValueError("a CLIP needs at least one tower")
        if input_ids is None and images is None:
            raise ValueError("give input_ids, images or both")
        kw = dict(remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
        out = {}
        if input_ids is not None:
            if self.text is None:
                raise ValueError("this CLIP has no text tower (text=None) but got input_ids")
            _check(self.text)
            states, pooled = TextTransformer(self.text, name="text_model", **kw)(
                input_ids, attention_mask, eot_positions
            )
            out.update(
                text_hidden_states=states,
                text_pooled=pooled,
                text_embeds=self._project(pooled, "text_projection"),
            )
        if images is not None:
            if self.vision is None:
                raise ValueError("this CLIP has no image tower (vision=None) but got images")
            _check(self.vision)
            states, pooled = VisionTransformer(self.vision, name="vision_model", **kw)(
                images, timesteps
            )
            out.update(
                image_hidden_states=states,
                image_pooled=pooled,
                image_embeds=self._project(pooled, "visual_projection"),
            )
        if self.text is not None and self.vision is not None:
            log_scale = self.param(
                "logit_scale",
                nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()),
                (),
                self.param_dtype,
            )
            if not self.learn_logit_scale:
                log_scale = jax.lax.stop_gradient(log_scale)
            # OpenAI clamps the log-scale at log(100) after each step; clamping the scale in the
            # forward pass is the functional equivalent (no gradient beyond the clamp).
            scale = jnp.minimum(jnp.exp(log_scale.astype(jnp.float32)), self.max_logit_scale)
            out["logit_scale"] = scale
            if input_ids is not None and images is not None:
                logits = (
                    scale * l2_normalize(out["text_embeds"]) @ l2_normalize(out["image_embeds"]).T
                )
                out.update(logits_per_text=logits, logits_per_image=logits.T)
        return CLIPOutput(**out)

    def _project(self, pooled: jax.Array, name: str) -> jax.Array:
        width = pooled.shape[-1]
        return nn.Dense(
            self.projection_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal_init(width**-0.5, (axes.EMBED, axes.JOINT_EMBED)),
            name=name,
        )(pooled).astype(jnp.float32)


def normalize_images(images: jax.Array, value_range: tuple[float, float] = (-1.0, 1.0)):
    """Images NHWC with values in `value_range` -> CLIP-normalised pixels (float32)."""
    lo, hi = value_range
    x = (images.astype(jnp.float32) - lo) / (hi - lo)  # to [0, 1]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def preprocess_images(images: jax.Array, image_size: int, value_range=(-1.0, 1.0)) -> jax.Array:
    """CLIP's preprocessing for our images: resize the short side (bicubic, antialiased), centre
    crop to image_size, normalise. images [B, H, W, 3] in value_range -> [B, S, S, 3] float32."""
    _, h, w, _ = images.shape
    scale = image_size / min(h, w)
    nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    x = images.astype(jnp.float32)
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (x.shape[0], nh, nw, x.shape[3]), "bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top : top + image_size, left : left + image_size]
    return normalize_images(jnp.clip(x, *value_range), value_range)


def clip_from_config(cfg, *, dtype: Dtype | None = None, towers: str = "both") -> CLIP:
    """A CLIP module from a config's `model` section (configs/clip_*.py, or the converter's).

    `towers`: "both", "text" or "vision" (the single-tower models of transformers).
    `dtype` overrides cfg.dtype (the compute dtype); params are cfg.param_dtype (float32).
    """
    if towers not in ("both", "text", "vision"):
        raise ValueError(f"towers must be 'both', 'text' or 'vision', got {towers!r}")
    text = cfg.get("text") if towers in ("both", "text") else None
    vision = cfg.get("vision") if towers in ("both", "vision") else None
    try:
        text = TextConfig(**dict(text)) if text is not None else None
        vision = VisionConfig(**dict(vision)) if vision is not None else None
    except TypeError as err:  # an unknown or missing key in the text/vision section
        raise ValueError(f"bad CLIP tower config: {err}") from None
    for tower in (text, vision):
        if tower is not None:
            _check(tower)
    return CLIP(
        text=text,
        vision=vision,
        projection_dim=cfg.projection_dim,
        logit_scale_init=cfg.get("logit_scale_init", math.log(1 / 0.07)),
        learn_logit_scale=cfg.get("learn_logit_scale", True),
        max_logit_scale=cfg.get("max_logit_scale", 100.0),
        remat=cfg.get("remat", False),
        dtype=jnp.dtype(dtype or cfg.get("dtype", "float32")),
        param_dtype=jnp.dtype(cfg.get("param_dtype", "float32")),
    )


def dummy_inputs(model: CLIP, batch: int = 1) -> dict[str, jax.Array]:
    """Inputs of the right shapes for `model.init` (both towers when present)."""
    inputs = {}
    if model.text is not None:
        inputs["input_ids"] = jnp.zeros((batch, model.text.context_length), jnp.int32)
    if model.vision is not None:
        v = model.vision
        inputs["images"] = jnp.zeros((batch, v.image_size, v.image_size, v.channels), jnp.float32)
        if v.num_timesteps is not None:
            inputs["timesteps"] = jnp.zeros((batch,), jnp.int32)
    return inputs


def init_params(model: CLIP, rng: jax.Array):
    """Boxed params (LogicallyPartitioned leaves) of `model`; unbox with nn.meta.unbox."""
    return model.init(rng, **dummy_inputs(model))["params"]


def abstract_params(model: CLIP):
    """Param shapes without allocating anything (jax.eval_shape of init), boxes kept."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def count_params(model: CLIP) -> int:
    """Number of parameters, from shapes only (works for ViT-H without allocating it)."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(model)))
    return sum(math.prod(leaf.shape) for leaf in leaves)
