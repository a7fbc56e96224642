"""diffusers' UNet2DConditionModel / UNet2DModel with Karlo's block types -> our UNet (SPEC 4.5).

The diffusers blocks ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D,
UNetMidBlock2DSimpleCrossAttn, SimpleCrossAttnUpBlock2D and ResnetUpsampleBlock2D (scale-shift
time norm, resampling inside ResBlocks, encoder keys before spatial keys) are the ADM UNet; this
module maps their names onto ours. Separate to_q/to_k/to_v and add_k_proj/add_v_proj are fused
into our per-head [q | k | v] and [k | v] projections. The Karlo/unCLIP decoder import uses it.
"""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.convert.common import (
    Rule,
    build_params,
    conv_kernel,
    identity,
    linear_kernel,
    load_safetensors,
)
from unclip_jax.models.unet import UNet

# Our block-level sub-names -> diffusers' names, for ResBlocks and attention blocks.
_RESBLOCK = {
    "in_layers_0/norm": ("norm1", "norm"),
    "in_layers_2": ("conv1", "conv"),
    "emb_layers_1": ("time_emb_proj", "linear"),
    "out_layers_0/norm": ("norm2", "norm"),
    "out_layers_3": ("conv2", "conv"),
    "skip_connection": ("conv_shortcut", "conv"),
}


def _fuse_per_head(heads: int, *mats):
    """Interleave projections per head: [q_h0, k_h0, v_h0, q_h1, ...] along the output axis.

    Each mat is [in, C] (kernels) or [C] (biases); the result has len(mats) * C outputs.
    """
    split = [m.reshape(m.shape[:-1] + (heads, m.shape[-1] // heads)) for m in mats]
    fused = np.stack(split, axis=-2)  # [..., heads, n, ch]
    return fused.reshape(fused.shape[:-3] + (-1,))


def _param_rules(ours: str, theirs: str, kind: str) -> dict[str, Rule]:
    if kind == "norm":
        return {f"{ours}/scale": Rule((f"{theirs}.weight",), identity),
                f"{ours}/bias": Rule((f"{theirs}.bias",), identity)}  # fmt: skip
    transform = conv_kernel if kind == "conv" else linear_kernel
    return {f"{ours}/kernel": Rule((f"{theirs}.weight",), transform),
            f"{ours}/bias": Rule((f"{theirs}.bias",), identity)}  # fmt: skip


def _attention_rules(ours: str, theirs: str, heads: int) -> dict[str, Rule]:
    rules = _param_rules(f"{ours}/norm/norm", f"{theirs}.group_norm", "norm")
    rules |= _param_rules(f"{ours}/proj_out", f"{theirs}.to_out.0", "linear")
    fused = {"qkv": ("to_q", "to_k", "to_v"), "encoder_kv": ("add_k_proj", "add_v_proj")}
    for name, parts in fused.items():
        rules[f"{ours}/{name}/kernel"] = Rule(
            tuple(f"{theirs}.{p}.weight" for p in parts),
            lambda *w: _fuse_per_head(heads, *(linear_kernel(x) for x in w)),
        )
        rules[f"{ours}/{name}/bias"] = Rule(
            tuple(f"{theirs}.{p}.bias" for p in parts), lambda *b: _fuse_per_head(heads, *b)
        )
    return rules


def block_map(unet: UNet) -> dict[str, tuple[str, str]]:
    """Our block names -> (diffusers prefix, "res" | "attn")."""
    nrb, levels = unet.num_res_blocks, len(unet.channel_mult)
    attn_levels = {lvl for lvl in range(levels) if 2**lvl in unet.attention_ds}
    out = {}
    for lvl in range(levels):
        for k in range(nrb):
            idx = 1 + lvl * (nrb + 1) + k
            out[f"input_blocks_{idx}_0"] = (f"down_blocks.{lvl}.resnets.{k}", "res")
            if lvl in attn_levels:
                out[f"input_blocks_{idx}_1"] = (f"down_blocks.{lvl}.attentions.{k}", "attn")
        if lvl < levels - 1:
            idx = 1 + lvl * (nrb + 1) + nrb
            out[f"input_blocks_{idx}_0"] = (f"down_blocks.{lvl}.downsamplers.0", "res")
    out["middle_block_0"] = ("mid_block.resnets.0", "res")
    if unet.middle_attention:
        out["middle_block_1"] = ("mid_block.attentions.0", "attn")
    out["middle_block_2"] = ("mid_block.resnets.1", "res")
    for up in range(levels):  # diffusers' up_blocks[0] is the deepest level
        lvl = levels - 1 - up
        for i in range(nrb + 1):
            idx = up * (nrb + 1) + i
            out[f"output_blocks_{idx}_0"] = (f"up_blocks.{up}.resnets.{i}", "res")
            j = 1
            if lvl in attn_levels:
                out[f"output_blocks_{idx}_1"] = (f"up_blocks.{up}.attentions.{i}", "attn")
                j = 2
            if lvl > 0 and i == nrb:
                out[f"output_blocks_{idx}_{j}"] = (f"up_blocks.{up}.upsamplers.0", "res")
    return out


def unet_rules(unet: UNet, channels_of: dict[str, int]) -> dict[str, Rule]:
    """Conversion rules for every parameter of `unet`; channels_of[block] gives attention widths."""
    rules = _param_rules("input_blocks_0_0", "conv_in", "conv")
    rules |= _param_rules("time_embed_0", "time_embedding.linear_1", "linear")
    rules |= _param_rules("time_embed_2", "time_embedding.linear_2", "linear")
    rules |= _param_rules("out_0/norm", "conv_norm_out", "norm")
    rules |= _param_rules("out_2", "conv_out", "conv")
    for ours, (theirs, kind) in block_map(unet).items():
        if kind == "attn":
            heads = channels_of[ours] // unet.num_head_channels
            rules |= _attention_rules(ours, theirs, heads)
        else:
            for sub, (name, layer) in _RESBLOCK.items():
                rules |= _param_rules(f"{ours}/{sub}", f"{theirs}.{name}", layer)
    return rules


def unet_from_diffusers_config(config: dict, **kwargs) -> UNet:
    """Our UNet equivalent of a diffusers UNet2DConditionModel/UNet2DModel config (Karlo blocks)."""
    down = config["down_block_types"]
    allowed = {"ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"}
    if not set(down) <= allowed:
        raise ValueError(f"unsupported diffusers down blocks {sorted(set(down) - allowed)}")
    channels = tuple(config["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of {base}")
    attn = tuple(2**i for i, kind in enumerate(down) if kind == "SimpleCrossAttnDownBlock2D")
    head_dim = config.get("attention_head_dim") or 8
    mid = config.get("mid_block_type", "UNetMidBlock2DSimpleCrossAttn")
    scale_shift = config.get("resnet_time_scale_shift", "default") == "scale_shift"
    return UNet(
        in_channels=config["in_channels"],
        model_channels=base,
        out_channels=config["out_channels"],
        num_res_blocks=config["layers_per_block"],
        attention_ds=attn,
        channel_mult=tuple(c // base for c in channels),
        num_head_channels=head_dim,
        use_scale_shift_norm=scale_shift,
        resblock_updown=True,
        middle_attention=mid == "UNetMidBlock2DSimpleCrossAttn"
        or bool(config.get("add_attention")),
        **kwargs,
    )


def load_diffusers_unet(folder: str | pathlib.Path, **unet_kwargs):
    """(UNet, params) from a diffusers folder (config.json, diffusion_pytorch_model.safetensors)."""
    folder = pathlib.Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    config = json.loads(config_path.read_text())
    unet = unet_from_diffusers_config(config, **unet_kwargs)
    state = load_safetensors(folder / "diffusion_pytorch_model.safetensors")
    size = config.get("sample_size") or 64
    encoder = config.get("cross_attention_dim")
    return unet, convert_unet(unet, state, size, encoder)


def convert_unet(unet: UNet, state: dict[str, np.ndarray], image_size: int, encoder_channels):
    """Our params for `unet` from a diffusers state dict (strict: see common.build_params)."""
    x = jnp.zeros((1, image_size, image_size, unet.in_channels))
    enc = None if encoder_channels is None else jnp.zeros((1, 1, encoder_channels))
    template = nn.meta.unbox(
        jax.eval_shape(
            lambda: unet.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), encoder_out=enc)
        )["params"]
    )
    channels_of = {
        name: p["norm"]["norm"]["scale"].shape[0]
        for name, p in template.items()
        if isinstance(p, dict) and "qkv" in p
    }
    rules = unet_rules(unet, channels_of)
    return build_params(template, rules, state, "diffusers UNet")
