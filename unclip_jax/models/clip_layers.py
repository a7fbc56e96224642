"""The pre-LN transformer encoder shared by CLIP's text and image towers.

Module and parameter names follow transformers' CLIP (`encoder.layers.N.self_attn.q_proj`,
`layer_norm1`, `mlp.fc1`, ...) so that importing a checkpoint is a name map. Attention projections
keep a separate heads axis ([D, H, Dh] kernels), so that tensor parallelism can shard heads by
name; the converter reshapes transformers' [D, D] matrices into that layout.

Precision: matmuls run in `dtype` (bf16 on accelerators), LayerNorm and softmax in float32, and the
residual stream is kept in float32 (a bf16 residual loses the small updates of late layers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import axes
from unclip_jax.models.layers import layer_norm

Dtype = Any

# Activation names as transformers' ACT2FN spells them (config.json's `hidden_act`).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact (erf), GLIDE's noised CLIP
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

_ACTIVATION = (axes.BATCH, axes.LENGTH, axes.EMBED)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def normal_init(std: float, names: tuple[str | None, ...]):
    """N(0, std^2) initialiser annotated with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


def causal_mask(length: int) -> jax.Array:
    """[1, 1, L, L] bool, True where query i may attend to key j (j <= i)."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, L] (1 = real token) -> [B, 1, 1, L] bool key mask."""
    return attention_mask.astype(bool)[:, None, None, :]


class HeadsProjection(nn.Module):
    """A linear layer into or out of attention heads, with the heads axis kept in the kernel.

    "split": x [..., D] -> [..., H, Dh], kernel [D, H, Dh], bias [H, Dh].
    "merge": x [..., H, Dh] -> [..., D], kernel [H, Dh, D], bias [D].
    (nn.DenseGeneral creates such kernels flat and reshapes them, which breaks their sharding
    constraint under a mesh; here the kernel is born in its final shape.)
    """

    num_heads: int
    head_dim: int
    mode: str  # "split" or "merge"
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, k = self.num_heads, self.head_dim
        if self.mode == "split":
            shape, names = (x.shape[-1], h, k), (axes.EMBED, axes.HEADS, axes.KV)
            bias_shape, bias_names = (h, k), (axes.HEADS, axes.KV)
            equation = "...d,dhk->...hk"
        else:
            width = h * k
            shape, names = (h, k, width), (axes.HEADS, axes.KV, axes.EMBED)
            bias_shape, bias_names = (width,), (axes.EMBED,)
            equation = "...hk,hkd->...d"
        kernel = self.param("kernel", normal_init(self.init_std, names), shape, self.param_dtype)
        bias = self.param("bias", zeros_init(bias_names), bias_shape, self.param_dtype)
        y = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (CLIPAttention).

    x [B, L, D] -> [B, L, D]; mask broadcastable to [B, H, L, L], True = attend.
    Initialisation follows OpenAI/transformers: in-projections N(0, D^-1/2 (2 n_layers)^-1/2),
    out-projection N(0, D^-1/2).
    """

    num_heads: int
    num_layers: int  # of the whole tower; sets the initialisation scale
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        in_std = width**-0.5 * (2 * self.num_layers) ** -0.5
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(name: str) -> HeadsProjection:
            return HeadsProjection(self.num_heads, head_dim, "split", in_std, name=name, **kw)

        q, k, v = proj("q_proj")(x), proj("k_proj")(x), proj("v_proj")(x)  # [B, L, H, Dh]
        # Logits and softmax in float32 whatever the compute dtype; masked logits get the most
        # negative float, not -inf, so a fully masked row is uniform instead of NaN.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits * head_dim**-0.5
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return HeadsProjection(
            self.num_heads, head_dim, "merge", width**-0.5, name="out_proj", **kw
        )(out)


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (CLIPMLP). x [B, L, D] -> [B, L, D]."""

    mlp_dim: int
    activation: str
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(
            self.mlp_dim,
            kernel_init=normal_init((2 * width) ** -0.5, (axes.EMBED, axes.MLP)),
            bias_init=zeros_init((axes.MLP,)),
            name="fc1",
            **kw,
        )(x.astype(self.dtype))
        h = get_activation(self.activation)(h)
        return nn.Dense(
            width,
            kernel_init=normal_init(
                width**-0.5 * (2 * self.num_layers) ** -0.5, (axes.MLP, axes.EMBED)
            ),
            bias_init=zeros_init((axes.EMBED,)),
            name="fc2",
            **kw,
        )(h)


class EncoderLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)) (CLIPEncoderLayer). x [B, L, D] float32."""

    num_heads: int
    mlp_dim: int
    activation: str
    num_layers: int
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(self.param_dtype, self.layer_norm_eps, name="layer_norm1")(x)
        x = x + SelfAttention(self.num_heads, self.num_layers, name="self_attn", **kw)(h, mask)
        h = layer_norm(self.param_dtype, self.layer_norm_eps, name="layer_norm2")(x)
        mlp = MLP(self.mlp_dim, self.activation, self.num_layers, name="mlp", **kw)
        x = x + mlp(h)
        return nn.with_logical_constraint(x.astype(jnp.float32), _ACTIVATION)


class Encoder(nn.Module):
    """`num_layers` EncoderLayers named `layers_N` (transformers' `encoder.layers.N`).

    With `remat`, each layer's activations are recomputed in the backward pass (memory for compute,
    what large towers need at long batch sizes).
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        x = nn.with_logical_constraint(x.astype(jnp.float32), _ACTIVATION)
        for i in range(self.num_layers):
            x = layer_cls(
                self.num_heads,
                self.mlp_dim,
                self.activation,
                self.num_layers,
                self.layer_norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layers_{i}",
            )(x, mask)
        return x
