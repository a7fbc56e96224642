"""OpenAI's glide-text2im checkpoints (base.pt, base_inpaint.pt, upsample.pt, upsample_inpaint.pt)
-> our GlideUNet config and params, without torch.

The four classes of glide-text2im's text2im_model.py are our GlideUNet's four modes:
  Text2ImUNet -> "base", InpaintText2ImUNet -> "inpaint", SuperResText2ImUNet -> "upsample",
  SuperResInpaintText2ImUnet -> "upsample_inpaint"
(the same network; only the input channels differ: 3, 7, 6, 10). Our names mirror theirs, so the
map is mechanical: `input_blocks.4.1.qkv` is `unet/input_blocks_4_1/qkv`, the text transformer's
keys sit under `text/`, `transformer_proj` at the top. Layout changes only: Linear [out, in] ->
[in, out], Conv2d OIHW -> HWIO, the attention blocks' Conv1d [out, in, 1] -> [in, out]. The
per-head [q | k | v] and [k | v] channel orders are the same on both sides.

What the state dict determines is read from its shapes (glide_config_from_state); the rest are
glide-text2im's released hyperparameters (model_creation.py), overridable:
  num_head_channels 64, xf_heads 8   (no parameter depends on the number of heads)
  image_size 2 ** (levels + 2)       (model_creation's rule tying channel_mult to image size:
                                      64 for the 4-level base, 256 for the 6-level upsampler)
  low_res_size image_size // 4       (the released 64 -> 256 upsampler)
  dropout 0.1                        (training only)

    model_cfg, params = load_glide("base.pt")   # model_cfg: a config's `model` section
    model = glide_from_config(model_cfg)
"""

from __future__ import annotations

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.convert.common import (
    ConversionError,
    Rule,
    build_params,
    conv_kernel,
    identity,
    linear_kernel,
)
from unclip_jax.convert.torch_pickle import load_torch_state_dict
from unclip_jax.models.glide import MODES, GlideUNet, glide_from_config

# glide-text2im's released hyperparameters that no parameter shape reveals (model_creation.py).
RELEASED = dict(num_head_channels=64, xf_heads=8, dropout=0.1)
# download.py's checkpoint names -> our modes.
_MODE_ALIASES = {"base-inpaint": "inpaint", "upsample-inpaint": "upsample_inpaint"}

# Our sub-module paths inside a block -> glide-text2im's, per block kind.
_RESBLOCK = {"in_layers_0/norm": "in_layers.0", "in_layers_2": "in_layers.2",
             "emb_layers_1": "emb_layers.1", "out_layers_0/norm": "out_layers.0",
             "out_layers_3": "out_layers.3", "skip_connection": "skip_connection"}  # fmt: skip
_ATTENTION = {"norm/norm": "norm", "qkv": "qkv", "encoder_kv": "encoder_kv", "proj_out": "proj_out"}
_TEXT_BLOCK = {"ln_1": "ln_1", "attn/c_qkv": "attn.c_qkv", "attn/c_proj": "attn.c_proj",
               "ln_2": "ln_2", "mlp/c_fc": "mlp.c_fc", "mlp/c_proj": "mlp.c_proj"}  # fmt: skip
_BLOCK = re.compile(r"^(input_blocks|output_blocks|middle_block|time_embed|out)((?:_\d+)+)$")


def conv1d_kernel(w):
    """Conv1d [out, in, 1] (the attention blocks' projections) -> Dense [in, out]."""
    if w.ndim != 3 or w.shape[-1] != 1:
        raise ValueError(f"expected a kernel-size-1 Conv1d weight [out, in, 1], got {w.shape}")
    return np.transpose(w[..., 0])


def _layer(ours: str, theirs: str, sub: dict) -> dict[str, Rule]:
    """Rules for one flax layer `ours` (its leaves `sub`) from the torch module `theirs`."""
    rules = {}
    for leaf, value in sub.items():
        if leaf == "kernel":
            transform = conv_kernel if len(value.shape) == 4 else linear_kernel
            rules[f"{ours}/kernel"] = Rule((f"{theirs}.weight",), transform)
        elif leaf in ("scale", "embedding"):
            rules[f"{ours}/{leaf}"] = Rule((f"{theirs}.weight",), identity)
        else:
            rules[f"{ours}/{leaf}"] = Rule((f"{theirs}.{leaf}",), identity)
    return rules


def _get(tree: dict, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def _unet_rules(unet: dict) -> dict[str, Rule]:
    """Rules for our UNet params (template `unet`), keyed 'unet/...'."""
    rules = {}
    for name, sub in unet.items():
        match = _BLOCK.match(name)
        if match is None:
            raise ValueError(f"unexpected UNet module {name!r}")  # our own tree: a bug if hit
        theirs = match.group(1) + match.group(2).replace("_", ".")
        ours = f"unet/{name}"
        if "in_layers_2" in sub:
            parts = {s: t for s, t in _RESBLOCK.items() if s.split("/")[0] in sub}
        elif "qkv" in sub:
            parts = dict(_ATTENTION)
        elif "norm" in sub:  # out_0: a GroupNorm32
            parts = {"norm": ""}
        elif name.startswith("input_blocks") and name != "input_blocks_0_0":
            parts = {"": "op"}  # Downsample(use_conv=True)
        elif name.startswith("output_blocks"):
            parts = {"": "conv"}  # Upsample(use_conv=True)
        else:  # input_blocks_0_0, time_embed_0/2, out_2
            parts = {"": ""}
        for our_sub, their_sub in parts.items():
            o = f"{ours}/{our_sub}" if our_sub else ours
            t = f"{theirs}.{their_sub}" if their_sub else theirs
            leaves = _get(sub, our_sub) if our_sub else sub
            layer = _layer(o, t, leaves)
            if our_sub in ("qkv", "encoder_kv", "proj_out"):  # Conv1d in glide-text2im
                layer[f"{o}/kernel"] = Rule((f"{t}.weight",), conv1d_kernel)
            rules |= layer
    return rules


def _text_rules(text: dict) -> dict[str, Rule]:
    """Rules for our TextTransformer params (template `text`), keyed 'text/...'."""
    rules = _layer("text/token_embedding", "token_embedding", text["token_embedding"])
    for name in ("positional_embedding", "padding_embedding"):
        if name in text:
            rules[f"text/{name}"] = Rule((name,), identity)
    if "final_ln" in text:
        rules |= _layer("text/final_ln", "final_ln", text["final_ln"])
    for block, sub in text["transformer"].items():
        i = block.removeprefix("resblocks_")
        for ours, theirs in _TEXT_BLOCK.items():
            rules |= _layer(f"text/transformer/{block}/{ours}",
                            f"transformer.resblocks.{i}.{theirs}", _get(sub, ours))  # fmt: skip
    return rules


def glide_rules(template: dict) -> dict[str, Rule]:
    """Conversion rules for every leaf of a GlideUNet params template."""
    rules = _layer("transformer_proj", "transformer_proj", template["transformer_proj"])
    return rules | _text_rules(template["text"]) | _unet_rules(template["unet"])


# ------------------------------------------------------------------------------------------------
# The model config from the state dict's shapes.


def _shape(state: dict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"not a glide-text2im text-conditional UNet: no {key!r}")
    return tuple(state[key].shape)


def _indices(state: dict, prefix: str) -> list[int]:
    found = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return sorted(found)


def _upsampler(state: dict, i: int) -> str | None:
    """'resblock' or 'conv' if output block i ends in an upsampler, else None."""
    last = max(_indices(state, f"output_blocks.{i}."), default=0)
    prefix = f"output_blocks.{i}.{last}."
    if last == 0 or f"{prefix}qkv.weight" in state:
        return None
    if f"{prefix}in_layers.2.weight" in state:
        return "resblock"
    return "conv" if f"{prefix}conv.weight" in state else None


def glide_config_from_state(
    state: dict,
    *,
    mode: str | None = None,
    image_size: int | None = None,
    num_head_channels: int = RELEASED["num_head_channels"],
    xf_heads: int = RELEASED["xf_heads"],
    low_res_size: int | None = None,
) -> ml_collections.ConfigDict:
    """Our `model` config section (glide_from_config's input) for a glide-text2im state dict.

    state: {key: array or anything with .shape}. From the shapes: mode (input channels),
    model_channels, channel_mult, num_res_blocks, attention levels, out_channels,
    use_scale_shift_norm, resblock_updown, text vocab/width/layers/context, final LayerNorm and
    padding embeddings. The other arguments default to the released values (module docstring).
    """
    if "label_emb.weight" in state:
        raise ConversionError("a class-conditional ADM UNet (label_emb), not a GLIDE text2im model")
    if "unemb.weight" in state:
        raise ConversionError("a text transformer with an autoregressive head (xf_ar, unemb): "
                              "not supported")  # fmt: skip
    if "token_embedding.weight" not in state:
        raise ConversionError("no text transformer (token_embedding.weight): GlideUNet needs the "
                              "text-conditional model (xf_width > 0)")  # fmt: skip
    time_dim, channels = _shape(state, "time_embed.0.weight")
    if time_dim != 4 * channels:
        raise ConversionError(f"time_embed.0.weight {(time_dim, channels)}: expected [4C, C]")
    first_out, in_channels = _shape(state, "input_blocks.0.0.weight")[:2]
    inferred = {v: k for k, v in MODES.items()}.get(in_channels)
    if inferred is None:
        raise ConversionError(f"input_blocks.0.0.weight takes {in_channels} input channels; "
                              f"GLIDE's modes take {sorted(MODES.values())}")  # fmt: skip
    mode = _MODE_ALIASES.get(mode, mode)
    if mode is not None and mode not in MODES:
        raise ConversionError(f"unknown GLIDE mode {mode!r}; expected one of {sorted(MODES)} "
                              f"or {sorted(_MODE_ALIASES)}")  # fmt: skip
    if mode is not None and mode != inferred:
        raise ConversionError(f"mode {mode!r} needs {MODES.get(mode)} input channels; this "
                              f"checkpoint takes {in_channels} ({inferred!r})")  # fmt: skip

    # Layout (unet.py): input blocks = 1 + levels * nrb + (levels - 1) and output blocks =
    # levels * (nrb + 1); output block nrb is the first to end in an upsampler (unless 1 level).
    n_in, n_out = len(_indices(state, "input_blocks.")), len(_indices(state, "output_blocks."))
    up_at = [i for i in range(n_out) if _upsampler(state, i) is not None]
    nrb = up_at[0] if up_at else n_out - 1
    levels = n_out // (nrb + 1) if nrb >= 1 else 0
    if nrb < 1 or n_out != levels * (nrb + 1) or n_in != levels * (nrb + 1):
        raise ConversionError(f"{n_in} input and {n_out} output blocks (upsamplers after output "
                              f"blocks {up_at}) do not form a glide-text2im UNet")  # fmt: skip
    firsts = [1 + level * (nrb + 1) for level in range(levels)]
    widths = [_shape(state, f"input_blocks.{i}.0.in_layers.2.weight")[0] for i in firsts]
    if any(w % channels for w in widths) or widths[0] != first_out:
        raise ConversionError(f"level widths {widths} are not multiples of model_channels "
                              f"{channels} (or disagree with input_blocks.0.0)")  # fmt: skip
    emb_out = _shape(state, "input_blocks.1.0.emb_layers.1.weight")[0]
    attention_ds = [2**lvl for lvl, i in enumerate(firsts)
                    if f"input_blocks.{i}.1.qkv.weight" in state]  # fmt: skip
    size = image_size or 2 ** (levels + 2)
    for ds in attention_ds:
        if size % ds:
            raise ConversionError(f"image_size {size} is not divisible by the attention "
                                  f"downsampling factor {ds}")  # fmt: skip
    attention_widths = {widths[-1]} | {widths[ds.bit_length() - 1] for ds in attention_ds}
    if any(w % num_head_channels for w in attention_widths):
        raise ConversionError(f"attention widths {sorted(attention_widths)} do not split into "
                              f"heads of {num_head_channels}: pass num_head_channels")  # fmt: skip
    vocab, width = _shape(state, "token_embedding.weight")
    if width % xf_heads:
        raise ConversionError(f"text width {width} does not split into {xf_heads} heads: pass "
                              "xf_heads")  # fmt: skip

    unet = ml_collections.ConfigDict()
    unet.image_size = size
    unet.in_channels = in_channels
    unet.out_channels = _shape(state, "out.2.weight")[0]
    unet.model_channels = channels
    unet.channel_mult = tuple(w // channels for w in widths)
    unet.num_res_blocks = nrb
    unet.attention_resolutions = ",".join(str(size // ds) for ds in sorted(attention_ds))
    unet.num_head_channels = num_head_channels
    unet.dropout = RELEASED["dropout"]
    unet.use_scale_shift_norm = emb_out == 2 * widths[0]
    # Without levels to resample between, the choice leaves no trace: keep the released one.
    unet.resblock_updown = _upsampler(state, up_at[0]) == "resblock" if up_at else True
    unet.middle_attention = "middle_block.1.qkv.weight" in state

    text = ml_collections.ConfigDict()
    text.vocab_size = vocab
    text.pad_id = vocab - 1  # glide-text2im pads with its end token, the last id
    text.text_ctx = _shape(state, "positional_embedding")[0]
    text.width = width
    text.layers = len(_indices(state, "transformer.resblocks."))
    text.heads = xf_heads
    text.final_ln = "final_ln.weight" in state
    text.padding_embedding = "padding_embedding" in state

    model = ml_collections.ConfigDict()
    model.mode = inferred
    model.remat = False
    model.text = text
    model.unet = unet
    if "upsample" in inferred:
        model.low_res_size = low_res_size or size // 4
    return model


# ------------------------------------------------------------------------------------------------
# Params.


def abstract_params(model: GlideUNet, low_res_size: int | None = None) -> dict:
    """Our params' shapes for `model` (jax.eval_shape of its init; nothing is computed)."""
    size, t = model.image_size, model.text
    x = jnp.zeros((1, size, size, 3))
    tokens = jnp.zeros((1, t.text_ctx), jnp.int32)
    kw = {}
    if "upsample" in model.mode:
        low = low_res_size or size // 4
        kw["low_res"] = jnp.zeros((1, low, low, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32),
                                               tokens, tokens > 0, **kw))  # fmt: skip
    return nn.meta.unbox(shapes["params"])


def convert_glide(model: GlideUNet, state: dict[str, np.ndarray]) -> dict:
    """Our params for `model` from a glide-text2im state dict (strict: common.build_params)."""
    template = abstract_params(model)
    return build_params(template, glide_rules(template), state, f"glide-text2im {model.mode}")


def load_glide(
    path: str | pathlib.Path,
    mode: str | None = None,
    *,
    image_size: int | None = None,
    num_head_channels: int = RELEASED["num_head_channels"],
    xf_heads: int = RELEASED["xf_heads"],
    low_res_size: int | None = None,
) -> tuple[ml_collections.ConfigDict, dict]:
    """(model config section, params) from a glide-text2im checkpoint (.pt), read without torch.

    mode: "base", "inpaint", "upsample", "upsample_inpaint" (or download.py's "base-inpaint",
    "upsample-inpaint"); None infers it from the input channels, a given mode is checked.
    The other arguments override the released hyperparameters (module docstring).
    Raises ConversionError naming every missing, unexpected or mis-shaped key.
    """
    state = load_torch_state_dict(path)
    config = glide_config_from_state(state, mode=mode, image_size=image_size,
                                     num_head_channels=num_head_channels, xf_heads=xf_heads,
                                     low_res_size=low_res_size)  # fmt: skip
    model = glide_from_config(config)
    return config, convert_glide(model, state)
