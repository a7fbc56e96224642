"""diffusers' PriorTransformer (Karlo's configuration) -> our DiffusionPrior (SPEC 4.5).

Supported: time_embed_act_fn "silu", norm_in_type None, embedding_proj_norm_type None,
encoder_hid_proj_type "linear", added_emb_type "prd", a positional embedding over all
num_embeddings + 4 positions (Karlo and diffusers' converted unCLIP). The separate to_q/to_k/to_v
of each block are fused per head into our [q | k | v] c_qkv; clip_mean/clip_std become our
`clip_mean`/`clip_std` (the "standardize" scaling). diffusers' -10000 mask bias and our excluded
keys agree to float32 precision (exp(-10000) = 0).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp

from unclip_jax.convert.common import Rule, build_params, identity, linear_kernel, load_safetensors
from unclip_jax.convert.diffusers_unet import _fuse_per_head
from unclip_jax.models.prior import DiffusionPrior, init_params

_REQUIRED = {
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
}


def prior_from_diffusers_config(config: dict, **kwargs) -> DiffusionPrior:
    """Our DiffusionPrior equivalent of a diffusers PriorTransformer config (Karlo options)."""
    wrong = {k: config.get(k, v) for k, v in _REQUIRED.items() if config.get(k, v) != v}
    if wrong:
        raise ValueError(f"unsupported PriorTransformer options {wrong}; expected {_REQUIRED}")
    if config.get("additional_embeddings", 4) != 4:
        raise ValueError("only additional_embeddings = 4 (text emb, time, x_t, prd) is supported")
    heads, head_dim = config.get("num_attention_heads", 32), config.get("attention_head_dim", 64)
    width = heads * head_dim
    if (config.get("time_embed_dim") or width) != width:
        raise ValueError("time_embed_dim must equal the transformer width")
    dim = config.get("embedding_dim", 768)
    if (config.get("embedding_proj_dim") or dim) != dim or (
        config.get("clip_embed_dim") or dim
    ) != dim:
        raise ValueError("embedding_proj_dim and clip_embed_dim must equal embedding_dim")
    return DiffusionPrior(
        clip_dim=dim,
        text_dim=dim,
        text_ctx=config.get("num_embeddings", 77),
        width=width,
        layers=config.get("num_layers", 20),
        heads=heads,
        scaling="standardize",
        learned_null=False,
        **kwargs,
    )


def _linear(ours: str, theirs: str) -> dict[str, Rule]:
    return {f"{ours}/kernel": Rule((f"{theirs}.weight",), linear_kernel),
            f"{ours}/bias": Rule((f"{theirs}.bias",), identity)}  # fmt: skip


def _norm(ours: str, theirs: str) -> dict[str, Rule]:
    return {f"{ours}/scale": Rule((f"{theirs}.weight",), identity),
            f"{ours}/bias": Rule((f"{theirs}.bias",), identity)}  # fmt: skip


def _flat(w):
    return w.reshape(-1)


def prior_rules(model: DiffusionPrior) -> dict[str, Rule]:
    """Conversion rules for every parameter of `model` from diffusers' state-dict names."""
    rules = {
        "positional_embedding": Rule(("positional_embedding",), lambda w: w.reshape(w.shape[1:])),
        "prd_emb": Rule(("prd_embedding",), _flat),
        "clip_mean": Rule(("clip_mean",), _flat),
        "clip_std": Rule(("clip_std",), _flat),
    }
    rules |= _linear("time_embed_0", "time_embedding.linear_1")
    rules |= _linear("time_embed_2", "time_embedding.linear_2")
    rules |= _linear("clip_img_proj", "proj_in")
    rules |= _linear("text_emb_proj", "embedding_proj")
    rules |= _linear("text_enc_proj", "encoder_hidden_states_proj")
    rules |= _norm("final_ln", "norm_out")
    rules |= _linear("out_proj", "proj_to_clip_embeddings")
    heads = model.heads
    for i in range(model.layers):
        ours, theirs = f"transformer/resblocks_{i}", f"transformer_blocks.{i}"
        rules |= _norm(f"{ours}/ln_1", f"{theirs}.norm1")
        rules |= _norm(f"{ours}/ln_2", f"{theirs}.norm3")
        rules |= _linear(f"{ours}/attn/c_proj", f"{theirs}.attn1.to_out.0")
        rules |= _linear(f"{ours}/mlp/c_fc", f"{theirs}.ff.net.0.proj")
        rules |= _linear(f"{ours}/mlp/c_proj", f"{theirs}.ff.net.2")
        parts = tuple(f"{theirs}.attn1.to_{p}" for p in "qkv")
        rules[f"{ours}/attn/c_qkv/kernel"] = Rule(
            tuple(f"{p}.weight" for p in parts),
            lambda *w: _fuse_per_head(heads, *(linear_kernel(x) for x in w)),
        )
        rules[f"{ours}/attn/c_qkv/bias"] = Rule(
            tuple(f"{p}.bias" for p in parts), lambda *b: _fuse_per_head(heads, *b)
        )
    return rules


def load_diffusers_prior(folder: str | pathlib.Path, **model_kwargs):
    """(DiffusionPrior, params) from a diffusers PriorTransformer folder.

    The folder holds config.json and diffusion_pytorch_model.safetensors (e.g. the `prior`
    subfolder of kakaobrain/karlo-v1-alpha in diffusers' layout). Raises ConversionError naming
    every missing, unexpected or mis-shaped tensor.
    """
    folder = pathlib.Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = prior_from_diffusers_config(config, **model_kwargs)
    state = load_safetensors(folder / "diffusion_pytorch_model.safetensors")
    template = jax.eval_shape(lambda rng: init_params(model, rng), jax.random.key(0))
    params = build_params(template, prior_rules(model), state, f"PriorTransformer {folder}")
    return model, jax.tree.map(jnp.asarray, params)
