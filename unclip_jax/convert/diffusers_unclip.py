"""diffusers' unCLIP (Karlo) decoder and super-res models -> our UnclipDecoder / UnclipUpsampler.

A diffusers unCLIP pipeline folder holds `text_proj/` (UnCLIPTextProjModel), `decoder/`
(UNet2DConditionModel with Karlo's blocks, class_embed_type "identity") and `super_res_first/`,
`super_res_last/` (attention-free UNet2DModel). The text projection maps onto the decoder's own
conditioning layers (SPEC 4.5), with Karlo's names:
  learned_classifier_free_guidance_embeddings   -> cf_param
  clip_image_embeddings_project_to_time_embeddings -> clip_emb
  embedding_proj                                -> text_feat_proj
  clip_extra_context_tokens_proj                -> clip_tok_proj (read channel-major, as diffusers)
  encoder_hidden_states_proj / text_encoder_hidden_states_norm -> text_seq_proj_0 / _1
and the UNets go through convert/diffusers_unet.py. Checks are strict (convert/common.py): every
missing, unexpected or mis-shaped key is named, prefixed with the folder it belongs to.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.convert.common import (
    ConversionError,
    Rule,
    build_params,
    flatten,
    identity,
    linear_kernel,
    load_safetensors,
)
from unclip_jax.convert.diffusers_unet import (
    convert_unet,
    unet_from_diffusers_config,
    unet_rules,
)
from unclip_jax.models.decoder import UnclipDecoder, UnclipUpsampler, init_params

_WEIGHTS = "diffusion_pytorch_model.safetensors"

_TEXT_PROJ = {
    "clip_emb": "clip_image_embeddings_project_to_time_embeddings",
    "text_feat_proj": "embedding_proj",
    "clip_tok_proj": "clip_extra_context_tokens_proj",
    "text_seq_proj_0": "encoder_hidden_states_proj",
}


def _read_config(folder: pathlib.Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return json.loads(path.read_text())


def text_proj_rules(prefix: str = "text_proj.") -> dict[str, Rule]:
    """Rules for the decoder's conditioning layers from an UnCLIPTextProjModel state dict."""
    rules = {"cf_param": Rule((f"{prefix}learned_classifier_free_guidance_embeddings",), identity)}
    for ours, theirs in _TEXT_PROJ.items():
        rules[f"{ours}/kernel"] = Rule((f"{prefix}{theirs}.weight",), linear_kernel)
        rules[f"{ours}/bias"] = Rule((f"{prefix}{theirs}.bias",), identity)
    norm = f"{prefix}text_encoder_hidden_states_norm"
    rules["text_seq_proj_1/scale"] = Rule((f"{norm}.weight",), identity)
    rules["text_seq_proj_1/bias"] = Rule((f"{norm}.bias",), identity)
    return rules


def decoder_from_diffusers_configs(unet_config: dict, proj_config: dict, **kwargs) -> UnclipDecoder:
    """Our UnclipDecoder ("clip" text pathway) for diffusers' decoder + text_proj configs."""
    if unet_config.get("class_embed_type") != "identity":
        raise ValueError(
            f"the unCLIP decoder adds the text projection's time embedding as "
            f"class_embed_type 'identity', got {unet_config.get('class_embed_type')!r}"
        )
    unet = unet_from_diffusers_config(unet_config, **kwargs)
    if proj_config["time_embed_dim"] != unet.time_embed_dim:
        raise ValueError(f"text_proj time_embed_dim {proj_config['time_embed_dim']} does not match "
                         f"the decoder's {unet.time_embed_dim}")  # fmt: skip
    if proj_config["cross_attention_dim"] != unet_config["cross_attention_dim"]:
        raise ValueError(
            f"text_proj cross_attention_dim {proj_config['cross_attention_dim']} "
            f"does not match the decoder's {unet_config['cross_attention_dim']}"
        )
    clip_dim = proj_config.get("clip_embeddings_dim", 768)
    return UnclipDecoder(unet, clip_dim=clip_dim,
                         clip_tokens=proj_config.get("clip_extra_context_tokens", 4),
                         encoder_channels=proj_config["cross_attention_dim"], text=None,
                         text_dim=clip_dim, image_size=unet_config.get("sample_size") or 64,
                         dtype=unet.dtype, param_dtype=unet.param_dtype)  # fmt: skip


def convert_decoder(decoder: UnclipDecoder, state: dict[str, np.ndarray]):
    """Our decoder params from a merged state dict whose keys start with "text_proj." (the text
    projection) or "decoder." (the UNet). Strict: see common.build_params."""
    template = jax.eval_shape(lambda: init_params(decoder, jax.random.key(0), text_ctx=1))
    flat = flatten(template)
    channels_of = {
        key.split("/")[1]: leaf.shape[0]
        for key, leaf in flat.items()
        if key.startswith("unet/") and key.endswith("/norm/norm/scale") and key.count("/") == 4
    }
    rules = text_proj_rules()
    for key, rule in unet_rules(decoder.unet, channels_of).items():
        rules[f"unet/{key}"] = Rule(tuple(f"decoder.{s}" for s in rule.sources), rule.transform)
    return build_params(template, rules, state, "diffusers unCLIP decoder")


def load_diffusers_decoder(root: str | pathlib.Path, **kwargs):
    """(UnclipDecoder, params) from a diffusers unCLIP folder holding text_proj/ and decoder/."""
    root = pathlib.Path(root)
    unet_config = _read_config(root / "decoder")
    proj_config = _read_config(root / "text_proj")
    decoder = decoder_from_diffusers_configs(unet_config, proj_config, **kwargs)
    state = {f"decoder.{k}": v for k, v in load_safetensors(root / "decoder" / _WEIGHTS).items()}
    state |= {f"text_proj.{k}": v
              for k, v in load_safetensors(root / "text_proj" / _WEIGHTS).items()}  # fmt: skip
    return decoder, convert_decoder(decoder, state)


def load_diffusers_upsampler(folder: str | pathlib.Path, *, low_res_size: int | None = None,
                             **kwargs):  # fmt: skip
    """(UnclipUpsampler, params) from a diffusers UNet2DModel folder (super_res_first/_last).

    low_res_size defaults to a quarter of sample_size (Karlo: 64 -> 256).
    """
    folder = pathlib.Path(folder)
    config = _read_config(folder)
    if config.get("in_channels") != 2 * config.get("out_channels", 3):
        raise ValueError(f"an upsampler takes [x_t, low_res]: in_channels must be twice "
                         f"out_channels, got {config.get('in_channels')} and "
                         f"{config.get('out_channels')}")  # fmt: skip
    unet = unet_from_diffusers_config(config, **kwargs)
    size = config.get("sample_size") or 256
    params = convert_unet(unet, load_safetensors(folder / _WEIGHTS), size,
                          config.get("cross_attention_dim"))  # fmt: skip
    model = UnclipUpsampler(unet, resize="bicubic", image_size=size,
                            low_res_size=low_res_size or size // 4)  # fmt: skip
    return model, {"unet": jax.tree.map(jnp.asarray, params)}


# diffusers' UnCLIPScheduler settings -> our diffusion config's names.
_SCHEDULES = {"squaredcos_cap_v2": "cosine", "linear": "linear"}
_MEAN_TYPES = {"epsilon": "epsilon", "sample": "start_x"}
_VAR_TYPES = {"fixed_small_log": "fixed_small", "learned_range": "learned_range"}


def read_unclip_scheduler(folder, diffusion_config) -> float | None:
    """The x_0 clamp of a diffusers UnCLIPScheduler folder (`clip_sample_range`, or None when
    `clip_sample` is off), after checking that its schedule, step count, prediction and variance
    are the ones `diffusion_config` samples with. A mismatch is a ConversionError naming the field:
    sampling with other settings than the reference would give other images without an error.
    """
    path = pathlib.Path(folder) / "scheduler_config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    cls = raw.get("_class_name", "UnCLIPScheduler")
    if cls != "UnCLIPScheduler":
        raise ConversionError(f"{path}: a {cls}, not an UnCLIPScheduler")
    checks = (
        ("beta_schedule", _SCHEDULES, "squaredcos_cap_v2", "schedule"),
        ("prediction_type", _MEAN_TYPES, "epsilon", "mean_type"),
        ("variance_type", _VAR_TYPES, "fixed_small_log", "var_type"),
    )
    for key, names, default, ours in checks:
        value = raw.get(key, default)
        if value not in names:
            raise ConversionError(f"{path}: {key} {value!r} is not supported ({sorted(names)})")
        if names[value] != diffusion_config[ours]:
            raise ConversionError(f"{path}: {key} {value!r} does not match the config's "
                                  f"diffusion.{ours} {diffusion_config[ours]!r}")  # fmt: skip
    steps = raw.get("num_train_timesteps", 1000)
    if steps != diffusion_config.num_timesteps:
        raise ConversionError(
            f"{path}: num_train_timesteps {steps} does not match the config's "
            f"diffusion.num_timesteps {diffusion_config.num_timesteps}"
        )
    if not raw.get("clip_sample", True):
        return None
    return float(raw.get("clip_sample_range", 1.0))


def scheduler_clamp(root, name: str, diffusion_config, default):
    """The x_0 clamp of `root/<name>_scheduler` (read and checked by read_unclip_scheduler), or
    `default` for a folder that ships no such scheduler."""
    folder = pathlib.Path(root) / f"{name}_scheduler"
    return read_unclip_scheduler(folder, diffusion_config) if folder.is_dir() else default
