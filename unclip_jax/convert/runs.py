"""Public weights -> run folders: what `unclip-jax convert` writes.

A converted run is a params-only checkpoint (checkpoint.save_params) whose config is a preset's
(its diffusion, sample and training sections) with the `model` section rewritten from the
imported model, so the run folder is read like a trained one:

  - `sample`, `vary`, `interpolate`, `ablate` and `eval` take it as `--clip`/`--prior-run`/
    `--decoder`/`--upsamplers` (pipelines/unclip.pipeline_from_runs);
  - a training config names it in `ckpt.init_from` to fine-tune from it (params only, resharded
    onto the new mesh).

Sources:
  convert_clip(src, out)   a transformers CLIP folder (CLIPModel, or a single tower) with its
                           tokenizer files -> a `clip` run (tokenizer/ inside)
  convert_karlo(src, out)  a diffusers unCLIP folder (kakaobrain/karlo-v1-alpha's layout) ->
                           out/clip, out/prior, out/decoder, out/upsampler
  convert_glide(src, out)  one glide-text2im checkpoint (base.pt, base_inpaint.pt, upsample.pt,
                           upsample_inpaint.pt; read without torch, convert/torch_pickle.py) and
                           its BPE files -> a `glide` run (tokenizer/ inside)

Every rewritten model section is checked: the model it builds must have exactly the imported
params' tree and shapes (jax.eval_shape, no compute), so a run that loads is a run that matches.
"""

from __future__ import annotations

import functools
import logging
import math
import pathlib

import jax
import ml_collections
import numpy as np

from unclip_jax import config_utils, storage
from unclip_jax.checkpoint import save_params
from unclip_jax.convert.common import ConversionError, flatten

log = logging.getLogger(__name__)

# OpenAI's CLIPs end training at the logit-scale clamp (log 100); Karlo ships the two towers as
# separate models without one, so the merged CLIP of a converted Karlo run gets this value.
_RELEASED_LOG_SCALE = math.log(100.0)


def _unet_section(section, unet, image_size: int) -> None:
    """Write a UNet module's shape into a config's model.unet section (glide_common.unet keys)."""
    section.image_size = image_size
    section.in_channels = unet.in_channels
    section.out_channels = unet.out_channels
    section.model_channels = unet.model_channels
    section.channel_mult = tuple(unet.channel_mult)
    section.num_res_blocks = unet.num_res_blocks
    section.attention_resolutions = ",".join(str(image_size // ds) for ds in unet.attention_ds)
    section.num_head_channels = unet.num_head_channels
    section.use_scale_shift_norm = unet.use_scale_shift_norm
    section.resblock_updown = unet.resblock_updown
    section.middle_attention = unet.middle_attention


def _check_matches(what: str, config_model, build, params) -> None:
    """The model built from the rewritten config section has exactly `params`' tree and shapes."""
    import flax.linen as nn

    expected = {k: tuple(v.shape) for k, v in flatten(nn.meta.unbox(build(config_model))).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
    if missing or extra or wrong:
        detail = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}"
                  if extra else "", f"{wrong[0]}: config {expected[wrong[0]]}, weights "
                  f"{got[wrong[0]]}" if wrong else ""]  # fmt: skip
        raise ConversionError(f"{what}: the config section written for these weights does not "
                              f"build them ({'; '.join(d for d in detail if d)})")  # fmt: skip


def _preset(spec: str, overrides=()) -> ml_collections.ConfigDict:
    return config_utils.load_config(spec, list(overrides))


def _stamp(config, source: pathlib.Path, what: str) -> None:
    with config.unlocked():
        config.converted_from = f"{what}: {storage.absolute(source)}"


def _local_source(src) -> pathlib.Path:
    """A source file or folder on local disk: a gs:// one is copied under the cache first
    (safetensors, torch pickles and transformers read local files)."""
    return storage.local_copy(src) if storage.is_remote(src) else pathlib.Path(src)


def _save_tokenizer(src: pathlib.Path, out: pathlib.Path, context: int) -> None:
    from unclip_jax.tokenizers import ClipTokenizer

    tokenizer = ClipTokenizer.from_pretrained(src, context_length=context)
    storage.write_folder(out / "tokenizer", tokenizer.save)


# ------------------------------------------------------------------------------------------------
# CLIP


def _clip_run(model_cfg, params, tokenizer_dir: pathlib.Path, out: pathlib.Path, *,
              preset: str, source: pathlib.Path, what: str) -> pathlib.Path:  # fmt: skip
    from unclip_jax.models.clip import abstract_params, clip_from_config

    config = _preset(preset)
    config.model = model_cfg
    _check_matches(what, config.model, lambda m: abstract_params(clip_from_config(m)), params)
    _stamp(config, source, what)
    if model_cfg.text is not None:
        _save_tokenizer(tokenizer_dir, out, model_cfg.text.context_length)
    return save_params(out, config, params)


def convert_clip(src, out, *, tokenizer=None, preset: str = "clip_vit_l14") -> pathlib.Path:
    """A transformers CLIP folder -> a `clip` run at `out` (tokenizer/ copied in our format).

    tokenizer: the folder with vocab.json + merges.txt (or tokenizer.json); default `src` itself,
    then src/tokenizer. preset: the config whose non-model sections the run carries.
    """
    from unclip_jax.convert.clip import load_hf_clip

    src, out = _local_source(src), storage.path(out)
    model_cfg, params = load_hf_clip(src)
    tok = _local_source(tokenizer) if tokenizer else _find_tokenizer(src)
    if model_cfg.text is not None and tok is None:
        raise FileNotFoundError(f"no tokenizer files (vocab.json + merges.txt, or "
                                f"tokenizer.json) in {src} or {src / 'tokenizer'}: pass "
                                "--tokenizer DIR")  # fmt: skip
    return _clip_run(model_cfg, params, tok, out, preset=preset, source=src,
                     what="transformers CLIP")  # fmt: skip


def _find_tokenizer(src: pathlib.Path) -> pathlib.Path | None:
    for folder in (src, src / "tokenizer"):
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            return folder
    return None


# ------------------------------------------------------------------------------------------------
# Karlo / diffusers unCLIP


def karlo_clip(root: pathlib.Path):
    """(model config, params): Karlo's text_encoder and (if present) image_encoder as one CLIP."""
    from unclip_jax.convert.clip import load_hf_clip

    text_cfg, params = load_hf_clip(root / "text_encoder")
    if (root / "image_encoder").is_dir():
        image_cfg, image_params = load_hf_clip(root / "image_encoder")
        if image_cfg.projection_dim != text_cfg.projection_dim:
            raise ConversionError(f"text_encoder projects to {text_cfg.projection_dim}, "
                                  f"image_encoder to {image_cfg.projection_dim}")  # fmt: skip
        text_cfg.vision = image_cfg.vision
        text_cfg.logit_scale_init = _RELEASED_LOG_SCALE
        log_scale = np.asarray(_RELEASED_LOG_SCALE, np.float32)
        params = {**params, **image_params, "logit_scale": log_scale}
    return text_cfg, params


def convert_karlo(src, out, *, clip_preset: str = "clip_vit_l14",
                  prior_preset: str = "prior_diffusion:karlo",
                  decoder_preset: str = "decoder64:karlo",
                  upsampler_preset: str = "upsample256:karlo") -> dict:  # fmt: skip
    """A diffusers unCLIP folder -> run folders out/{clip, prior, decoder, upsampler}.

    Sizes come from the weights; the presets give the diffusion and sampling settings (Karlo's:
    prior 25 steps, decoder 50 steps guidance 8, super-res 7 ancestral steps), the folder's
    `*_scheduler` configs the x_0 clamps (checked against the presets' diffusion sections). The
    upsampler run holds super_res_first and super_res_last as params {"first", "last"}
    (model.last_step), the second used for the final step as Karlo does; it samples but does not
    train. An image-variations folder (image_encoder/, no prior/) converts without a prior run.
    """
    from unclip_jax.convert.diffusers_prior import load_diffusers_prior
    from unclip_jax.convert.diffusers_unclip import (
        load_diffusers_decoder,
        load_diffusers_upsampler,
        scheduler_clamp,
    )
    from unclip_jax.models import decoder as dec
    from unclip_jax.models.prior import init_params as prior_init
    from unclip_jax.models.prior import prior_from_config

    root, out = _local_source(src), storage.path(out)
    for name in ("text_encoder", "tokenizer", "text_proj", "decoder"):
        if not (root / name).is_dir():
            raise FileNotFoundError(f"{root / name} is missing: not a diffusers unCLIP folder")
    if not ((root / "prior").is_dir() or (root / "image_encoder").is_dir()):
        raise FileNotFoundError(f"{root} has neither prior/ (text to image) nor image_encoder/ "
                                "(image variations): not a diffusers unCLIP folder")  # fmt: skip

    def check_scheduler(name: str, config) -> None:
        """The prior's clamp goes into its run's config; the decoder and upsampler runs sample
        clamped to [-1, 1] (pipeline_from_runs), so their schedulers must ask for that."""
        if name == "prior":
            config.sample.clamp = scheduler_clamp(root, name, config.diffusion,
                                                  config.sample.clamp)  # fmt: skip
        elif scheduler_clamp(root, name, config.diffusion, 1.0) != 1.0:
            raise ConversionError(f"{root / (name + '_scheduler')}: a {name} run samples with x_0 "
                                  "clamped to [-1, 1]; this scheduler asks otherwise "
                                  "(pipeline_from_diffusers reads it as it is)")  # fmt: skip

    # Every component is read and checked before anything is written: a folder that fails
    # anywhere leaves no run behind that looks complete.
    writes = {}

    clip_cfg, clip_params = karlo_clip(root)
    writes["clip"] = lambda: _clip_run(clip_cfg, clip_params, root / "tokenizer", out / "clip",
                                       preset=clip_preset, source=root,
                                       what="Karlo CLIP")  # fmt: skip
    context = clip_cfg.text.context_length

    if (root / "prior").is_dir():
        prior, prior_params = load_diffusers_prior(root / "prior")
        config = _preset(prior_preset)
        check_scheduler("prior", config)
        m = config.model
        for field in ("clip_dim", "text_dim", "text_ctx", "width", "layers", "heads", "scaling",
                      "learned_null"):  # fmt: skip
            setattr(m, field, getattr(prior, field))
        _check_matches("Karlo prior", m,
                       lambda m: jax.eval_shape(lambda: prior_init(prior_from_config(m),
                                                                   jax.random.key(0))),
                       prior_params)  # fmt: skip
        _stamp(config, root / "prior", "diffusers PriorTransformer")
        writes["prior"] = functools.partial(save_params, out / "prior", config, prior_params)

    decoder, dec_params = load_diffusers_decoder(root)
    config = _preset(decoder_preset)
    check_scheduler("decoder", config)
    m = config.model
    m.text_pathway, m.clip_dim, m.text_dim = "clip", decoder.clip_dim, decoder.text_dim
    m.text_ctx, m.clip_tokens = context, decoder.clip_tokens
    m.encoder_channels = decoder.encoder_channels
    _unet_section(m.unet, decoder.unet, decoder.image_size)
    _check_matches("Karlo decoder", m,
                   lambda m: jax.eval_shape(lambda: dec.init_params(
                       dec.decoder_from_config(m), jax.random.key(0), text_ctx=m.text_ctx)),
                   dec_params)  # fmt: skip
    _stamp(config, root / "decoder", "diffusers unCLIP decoder + text_proj")
    writes["decoder"] = functools.partial(save_params, out / "decoder", config, dec_params)

    if (root / "super_res_first").is_dir():
        up, first = load_diffusers_upsampler(root / "super_res_first",
                                             low_res_size=decoder.image_size)  # fmt: skip
        config = _preset(upsampler_preset)
        check_scheduler("super_res", config)
        m = config.model
        m.low_res_size = up.low_res_size
        _unet_section(m.unet, up.unet, up.image_size)

        def build(m):
            return jax.eval_shape(lambda: dec.init_params(dec.upsampler_from_config(m),
                                                          jax.random.key(0)))  # fmt: skip

        _check_matches("Karlo super_res_first", m, build, first)
        params = first
        with config.unlocked():
            m.last_step = (root / "super_res_last").is_dir()
        if m.last_step:
            _, last = load_diffusers_upsampler(root / "super_res_last",
                                               low_res_size=decoder.image_size)  # fmt: skip
            _check_matches("Karlo super_res_last", m, build, last)
            params = {"first": first, "last": last}
        _stamp(config, root / "super_res_first", "diffusers unCLIP super-res")
        writes["upsampler"] = functools.partial(save_params, out / "upsampler", config, params)
    runs = {}
    for name, write in writes.items():
        runs[name] = write()
        log.info("converted %s -> %s", name, runs[name])
    return runs


# ------------------------------------------------------------------------------------------------
# GLIDE (glide-text2im)

# Our mode -> the preset whose diffusion, sampling and training sections the run carries.
GLIDE_PRESETS = {"base": "glide_base64", "inpaint": "glide_inpaint64",
                 "upsample": "glide_upsample256",
                 "upsample_inpaint": "glide_upsample256:inpaint"}  # fmt: skip


def convert_glide(src, out, *, tokenizer, mode: str | None = None, preset: str | None = None,
                  **released) -> pathlib.Path:  # fmt: skip
    """A glide-text2im checkpoint -> a `glide` run at `out`, sampled by `unclip-jax sample --base`
    (base, inpaint) or `--upsampler` (upsample, upsample_inpaint), or `inpaint`.

    tokenizer: a folder with glide-text2im's BPE files (its glide_text2im/tokenizer/:
    encoder.json.gz + vocab.bpe.gz) or GPT-2's vocab.json + merges.txt; saved into out/tokenizer.
    mode: checked against the weights (None: inferred from them). preset: default by mode
    (GLIDE_PRESETS); the model section is the imported one, the compute dtype the preset's.
    released: load_glide's overrides of the released hyperparameters no weight reveals
    (image_size, num_head_channels, xf_heads, low_res_size), for checkpoints other than OpenAI's.
    """
    from unclip_jax.convert.glide import abstract_params, load_glide
    from unclip_jax.models.glide import glide_from_config
    from unclip_jax.tokenizers import Gpt2BpeTokenizer

    src, out = _local_source(src), storage.path(out)
    if tokenizer is None:
        raise FileNotFoundError("a GLIDE run needs its BPE files: pass --tokenizer DIR (glide-"
                                "text2im's glide_text2im/tokenizer folder)")  # fmt: skip
    bpe = Gpt2BpeTokenizer.from_folder(tokenizer)
    model_cfg, params = load_glide(src, mode, **released)
    if model_cfg.text.vocab_size != bpe.vocab_size:
        raise ConversionError(f"{src} embeds {model_cfg.text.vocab_size} tokens but the tokenizer "
                              f"in {tokenizer} has {bpe.vocab_size}")  # fmt: skip
    config = _preset(preset or GLIDE_PRESETS[model_cfg.mode])
    with config.unlocked():
        dtype = config.model.get("dtype", "float32")
        config.model = model_cfg
        config.model.dtype = dtype
        config.data.tokenizer = "gpt2_bpe"

    def build(m):
        return abstract_params(glide_from_config(m), m.get("low_res_size"))

    _check_matches(f"glide-text2im {model_cfg.mode}", config.model, build, params)
    _stamp(config, src, f"glide-text2im {model_cfg.mode}")
    storage.write_folder(out / "tokenizer", bpe.save)
    return save_params(out, config, params)
