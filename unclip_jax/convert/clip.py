"""transformers' CLIP checkpoints (config.json + model.safetensors) -> our CLIP params and config.

Handles the three classes transformers saves CLIP as: `CLIPModel` (both towers, model_type "clip"),
`CLIPTextModelWithProjection` ("clip_text_model") and `CLIPVisionModelWithProjection`
("clip_vision_model"); sharded checkpoints (model.safetensors.index.json) too. Weights are read with
safetensors only: pickled `pytorch_model.bin` files are refused, never loaded.

Our parameter names mirror transformers' (see models/clip.py), so the map is mechanical:
`layers_N` <-> `layers.N`, kernel/scale/embedding <-> weight, plus layout changes: Linear [out, in]
-> [in, out]; q/k/v -> [D, heads, head_dim]; out_proj -> [heads, head_dim, D]; patch conv OIHW ->
HWIO. Every missing, unexpected or mis-shaped key is reported by name (convert/common.py).

    config, params = load_hf_clip("path/to/clip-vit-large-patch14")
    model = clip_from_config(config)
"""

from __future__ import annotations

import json
import math
import pathlib

import flax.linen as nn
import ml_collections
import numpy as np

from unclip_jax.convert.common import (
    ConversionError,
    Rule,
    build_params,
    conv_kernel,
    flatten,
    identity,
    linear_kernel,
    load_safetensors,
)
from unclip_jax.models.clip import CLIP, abstract_params, clip_from_config

# transformers' defaults: saved configs may omit keys that equal them.
_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, eos_token_id=49407, projection_dim=512,
)  # fmt: skip
_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=512,
)  # fmt: skip
_MODEL_TYPES = {"clip": "both", "clip_text_model": "text", "clip_vision_model": "vision"}
# Non-persistent buffers that older checkpoints still contain; they carry no weights.
_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _square(value, key: str) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"only square {key} is supported, got {value}")
        value = value[0]
    return int(value)


def _text_config(hf: dict) -> ml_collections.ConfigDict:
    c = {**_TEXT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    eos = c["eos_token_id"]
    if isinstance(eos, list):
        eos = eos[0]
    return ml_collections.ConfigDict(
        dict(
            vocab_size=int(c["vocab_size"]),
            context_length=int(c["max_position_embeddings"]),
            width=int(c["hidden_size"]),
            layers=int(c["num_hidden_layers"]),
            heads=int(c["num_attention_heads"]),
            mlp_dim=int(c["intermediate_size"]),
            activation=str(c["hidden_act"]),
            layer_norm_eps=float(c["layer_norm_eps"]),
            eos_token_id=int(eos),
            # transformers keeps argmax pooling for configs that still say eos_token_id = 2.
            eot_pooling="argmax" if eos == 2 else "first_eos",
        )
    )


def _vision_config(hf: dict) -> ml_collections.ConfigDict:
    c = {**_VISION_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    return ml_collections.ConfigDict(
        dict(
            image_size=_square(c["image_size"], "image_size"),
            patch_size=_square(c["patch_size"], "patch_size"),
            channels=int(c["num_channels"]),
            width=int(c["hidden_size"]),
            layers=int(c["num_hidden_layers"]),
            heads=int(c["num_attention_heads"]),
            mlp_dim=int(c["intermediate_size"]),
            activation=str(c["hidden_act"]),
            layer_norm_eps=float(c["layer_norm_eps"]),
            num_timesteps=None,
            normalize_input=False,
        )
    )


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
    """Our `model` config section from a transformers CLIP config.json (as a dict)."""
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ConversionError(
            f"config.json has model_type {model_type!r}; expected one of {sorted(_MODEL_TYPES)}"
        )
    towers = _MODEL_TYPES[model_type]
    c = ml_collections.ConfigDict()
    c.text = None
    c.vision = None
    if towers == "both":
        # Configs written by old transformers versions nest the towers as *_config_dict.
        text = hf.get("text_config") or hf.get("text_config_dict") or {}
        vision = hf.get("vision_config") or hf.get("vision_config_dict") or {}
        c.text = _text_config(text)
        c.vision = _vision_config(vision)
        c.projection_dim = int(hf.get("projection_dim", 512))
        c.logit_scale_init = float(hf.get("logit_scale_init_value", 2.6592))
    elif towers == "text":
        c.text = _text_config(hf)
        c.projection_dim = int(hf.get("projection_dim", _TEXT_DEFAULTS["projection_dim"]))
        c.logit_scale_init = math.log(1 / 0.07)
    else:
        c.vision = _vision_config(hf)
        c.projection_dim = int(hf.get("projection_dim", _VISION_DEFAULTS["projection_dim"]))
        c.logit_scale_init = math.log(1 / 0.07)
    c.learn_logit_scale = True
    c.max_logit_scale = 100.0
    c.remat = False
    c.dtype = "float32"
    c.param_dtype = "float32"
    return c


# ------------------------------------------------------------------------------------------------
# Names and layouts.

_MODULE_NAMES = {"pre_layernorm": "pre_layrnorm"}  # transformers' spelling
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def hf_key(ours: str) -> str:
    """Our flat key -> transformers' key.

    'text_model/encoder/layers_3/mlp/fc1/kernel' -> 'text_model.encoder.layers.3.mlp.fc1.weight'
    """
    *modules, leaf = ours.split("/")
    names = []
    for m in modules:
        if m.startswith("layers_") and m[len("layers_") :].isdigit():
            names += ["layers", m[len("layers_") :]]
        else:
            names.append(_MODULE_NAMES.get(m, m))
    return ".".join(names + [_LEAF_NAMES.get(leaf, leaf)])


def _hf_shape(ours: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape transformers stores our parameter `ours` (of shape `shape`) in."""
    *modules, leaf = ours.split("/")
    module = modules[-1] if modules else ""
    if module in ("q_proj", "k_proj", "v_proj"):
        d, h, k = shape if leaf == "kernel" else (None, *shape)
        return (h * k, d) if leaf == "kernel" else (h * k,)
    if module == "out_proj" and leaf == "kernel":
        h, k, d = shape
        return (d, h * k)
    if module == "patch_embedding":
        p1, p2, c, d = shape
        return (d, c, p1, p2)
    if leaf == "kernel":
        return shape[::-1]
    return shape


def _transform(ours: str, shape: tuple[int, ...]):
    """The function that turns transformers' tensor into ours (whose shape is `shape`).

    It first checks the tensor's own shape, so that a mis-shaped tensor is reported as such
    rather than as a failed reshape.
    """
    *modules, leaf = ours.split("/")
    module = modules[-1] if modules else ""
    expected = _hf_shape(ours, shape)
    if module in ("q_proj", "k_proj", "v_proj", "out_proj") and leaf == "kernel":
        # [D, D] (out, in) -> [D_in, heads, head_dim] or [heads, head_dim, D_out]
        layout = lambda w: np.transpose(w).reshape(shape)  # noqa: E731
    elif module in ("q_proj", "k_proj", "v_proj"):
        layout = lambda b: b.reshape(shape)  # noqa: E731
    elif module == "patch_embedding":
        layout = conv_kernel
    elif leaf == "kernel":
        layout = linear_kernel
    else:
        layout = identity

    def transform(w: np.ndarray) -> np.ndarray:
        if tuple(w.shape) != expected:
            raise ValueError(f"shape {tuple(w.shape)} in the checkpoint, expected {expected}")
        return layout(w)

    return transform


def _inverse(ours: str, value: np.ndarray) -> np.ndarray:
    """Our tensor -> transformers' layout (for export)."""
    *modules, leaf = ours.split("/")
    module = modules[-1] if modules else ""
    if module in ("q_proj", "k_proj", "v_proj"):
        if leaf == "kernel":
            return np.ascontiguousarray(value.reshape(value.shape[0], -1).T)
        return value.reshape(-1)
    if module == "out_proj" and leaf == "kernel":
        return np.ascontiguousarray(value.reshape(-1, value.shape[-1]).T)
    if module == "patch_embedding":
        return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    if leaf == "kernel":
        return np.ascontiguousarray(value.T)
    return value


def conversion_rules(model: CLIP) -> dict[str, Rule]:
    """One Rule per parameter of `model`: its transformers key and the layout transform."""
    template = flatten(abstract_params(model))
    return {
        k: Rule((hf_key(k),), _transform(k, tuple(v.shape)))
        for k, v in template.items()
        if not k.endswith("timestep_embedding/embedding")  # noise-aware: no transformers twin
    }


def params_from_hf(state: dict[str, np.ndarray], model: CLIP, what: str = "CLIP checkpoint"):
    """Our params (nested dict of float32 NumPy arrays) from a transformers state dict."""
    if model.vision is not None and model.vision.num_timesteps is not None:
        raise ConversionError("transformers has no noise-aware CLIP; nothing to import into it")
    state = {k: v for k, v in state.items() if k not in _BUFFERS}
    return build_params(abstract_params(model), conversion_rules(model), state, what)


def hf_state_dict(params) -> dict[str, np.ndarray]:
    """Our params -> transformers' state dict (float32 NumPy), the inverse of params_from_hf."""
    flat = flatten(nn.meta.unbox(params))
    return {hf_key(k): _inverse(k, np.asarray(v, np.float32)) for k, v in flat.items()}


def _read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ConversionError(f"{index} is not a safetensors index ({err})") from None
        state = {}
        for shard in shards:
            state.update(load_safetensors(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        raise ConversionError(
            f"{folder} holds only pytorch_model.bin; pickled weights are never loaded. Convert "
            "it to safetensors first (transformers: save_pretrained(..., safe_serialization=True))"
        )
    raise FileNotFoundError(f"no model.safetensors (or its index) in {folder}")


def load_hf_clip(path: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, dict]:
    """(our model config, params) from a transformers CLIP folder (config.json + safetensors).

    The params are float32 NumPy arrays in a nested dict, unboxed; place them on devices with the
    shardings of `nn.get_partition_spec(abstract_params(clip_from_config(config)))`.
    """
    folder = pathlib.Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_file} is not valid JSON ({err})") from None
    config = config_from_hf(hf)
    model = clip_from_config(config)
    params = params_from_hf(_read_weights(folder), model, what=str(folder))
    return config, params
