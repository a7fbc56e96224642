"""The unCLIP model kinds of the shared training loop: clip, prior, ar_prior, decoder, upsampler.

Data flow (DESIGN: data -> train -> checkpoint):
  - `clip` trains on the image-text source (`shapes`) with a BPE learned from its captions, saved
    in the run's `tokenizer/` folder (and reused on resume);
  - `unclip-jax data embed` then writes the CLIP side dataset (config.data.embeddings);
  - `prior` and `ar_prior` train on its embeddings; the diffusion prior's Karlo-style dataset
    statistics come from the side dataset's stats file, the AR prior's codec (PCA + buckets) is
    fitted on its embeddings once and kept in the run as `codec.npz`;
  - `decoder` trains on the side dataset joined with its source images;
  - `upsampler` trains on the source images alone.
Batches hold numeric arrays only (captions and indices are dropped before the step). Every kind
offers a `sample` hook (train.sample_every): train/unclip_hooks.py.
"""

from __future__ import annotations

import functools
import io
import logging

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import storage
from unclip_jax.train import unclip_hooks
from unclip_jax.train.kinds import ModelKind, data_source

log = logging.getLogger(__name__)


def _embeddings_dir(config) -> str:
    folder = config.data.get("embeddings")
    if not folder:
        raise ValueError(f"a {config.kind!r} run reads CLIP embeddings: set data.embeddings to a "
                         "folder written by `unclip-jax data embed`")  # fmt: skip
    return folder


def pad_to(x: np.ndarray, length: int, axis: int = 1) -> np.ndarray:
    current = x.shape[axis]
    if current > length:
        raise ValueError(f"CLIP's context ({current}) is longer than the model's ({length})")
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - current)
    return np.pad(x, pad)


def _embedding_batches(config, global_batch, process_index, process_count, keys, *,
                       join_images=False, image_size=None, text_ctx=None, post=None):  # fmt: skip
    """Side-dataset batches with `keys` kept (text arrays padded to text_ctx), then `post`."""
    from unclip_jax.data.embeddings import JoinedSource, embedding_source, make_embedding_loader
    from unclip_jax.data.loader import MappedBatches

    source = embedding_source(_embeddings_dir(config), config.data.split)
    if join_images:
        source = JoinedSource(source, data_source(config))
    batches = make_embedding_loader(source, global_batch=global_batch, seed=config.seed,
                                    image_size=image_size, process_index=process_index,
                                    process_count=process_count)  # fmt: skip

    def select(batch):
        out = {k: np.asarray(batch[k]) for k in keys}
        if text_ctx is not None:
            for k in ("text_tokens", "text_mask", "tokens"):
                if k in out:
                    out[k] = pad_to(out[k], text_ctx)
        return out if post is None else post(out)

    return MappedBatches(batches, select)


def _dtype(config):
    """The compute dtype of config.model.dtype (params, norms and losses stay float32)."""
    return jnp.dtype(config.model.get("dtype", "float32"))


def _replace_boxed(params, name, value):
    """params with the (possibly LogicallyPartitioned) leaf `name` replaced by `value`."""
    leaf = params[name]
    value = jnp.asarray(value, jnp.float32).reshape(-1)
    return dict(params, **{name: leaf.replace_boxed(value) if hasattr(leaf, "replace_boxed")
                           else value})  # fmt: skip


# ------------------------------------------------------------------------------------------------


def clip_pixels(images: np.ndarray) -> np.ndarray:
    """Host images in [-1, 1] -> CLIP-normalised float32 pixels: what a plain image tower takes
    (make_clip_loss), as `data embed`, the pipelines and the sample hook give them on device
    (models/clip.preprocess_images)."""
    from unclip_jax.models.clip import CLIP_MEAN, CLIP_STD

    mean, std = np.float32(CLIP_MEAN), np.float32(CLIP_STD)
    return ((np.asarray(images, np.float32) + 1.0) / 2.0 - mean) / std


def clip_kind(config, workdir) -> ModelKind:
    """Contrastive CLIP on the source dataset's captions with a BPE trained on them. A
    noise-aware image tower (vision.num_timesteps: noised_clip_b64) sees x_t of the images at a
    uniform timestep of config.diffusion's chain (the GLIDE base's), GLIDE's CLIP-guidance
    classifier."""
    from unclip_jax import diffusion
    from unclip_jax.data import loader
    from unclip_jax.models.clip import clip_from_config
    from unclip_jax.models.clip import init_params as clip_init
    from unclip_jax.train.clip import make_clip_loss, make_noised_clip_loss

    model = clip_from_config(config.model)
    if config.model.vision.get("num_timesteps") is None:
        loss_fn = make_clip_loss(model)
    else:
        table = diffusion.create_diffusion(config.diffusion.schedule,
                                           config.diffusion.num_timesteps)  # fmt: skip
        loss_fn = make_noised_clip_loss(model, table)
    tokenizer = clip_tokenizer_for_run(config, workdir)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids; the text tower "
                         f"{config.model.text.vocab_size}")  # fmt: skip

    def data(global_batch, process_index, process_count):
        grain_loader = loader.make_loader(data_source(config), global_batch=global_batch,
                                          seed=config.seed,
                                          image_size=config.model.vision.image_size,
                                          process_index=process_index,
                                          process_count=process_count)  # fmt: skip

        def tokenize(batch):
            tokens = tokenizer([str(c) for c in batch["caption"]])
            images = np.asarray(batch["image"], np.float32)  # [-1, 1]
            if not config.model.vision.normalize_input:
                images = clip_pixels(images)
            return {"images": images, "input_ids": tokens.input_ids,
                    "eot_positions": tokens.eot_positions}  # fmt: skip

        return loader.MappedBatches(grain_loader, tokenize)

    source_of = functools.partial(data_source, config)  # split -> the run's data source
    sample = unclip_hooks.clip_sample(config, model, tokenizer, source_of)
    return ModelKind(init=functools.partial(clip_init, model), loss_fn=loss_fn, data=data,
                     sample=sample)  # fmt: skip


def clip_tokenizer_for_run(config, workdir):
    """The run's BPE (workdir/tokenizer), trained on the source captions the first time."""
    from unclip_jax.tokenizers import ClipTokenizer, train_bpe
    from unclip_jax.train.kinds import save_run_tokenizer, source_captions

    folder = storage.path(workdir) / "tokenizer"
    context = config.model.text.context_length
    if folder.is_dir():
        return ClipTokenizer.from_pretrained(folder, context_length=context)
    captions = source_captions(data_source(config), config.data.get("bpe_captions", 5000))
    tokenizer = train_bpe(captions, vocab_size=config.model.text.vocab_size,
                          context_length=context)  # fmt: skip
    save_run_tokenizer(tokenizer, folder)
    log.info("trained a %d-id BPE on %d captions", tokenizer.vocab_size, len(captions))
    return tokenizer


def prior_kind(config) -> ModelKind:
    """The diffusion prior on the side dataset (Karlo-style stats from its stats file)."""
    from unclip_jax import diffusion
    from unclip_jax.data.embeddings import load_null_text, load_stats
    from unclip_jax.models.prior import init_params, prior_from_config
    from unclip_jax.train.prior import prior_loss

    model = prior_from_config(config.model, dtype=_dtype(config))
    folder = _embeddings_dir(config)
    null_text = None
    if not model.learned_null:
        null = load_null_text(folder)
        null_text = {"text_emb": null["text_emb"],
                     "text_tokens": pad_to(null["text_tokens"][None], model.text_ctx)[0],
                     "text_mask": pad_to(null["text_mask"][None], model.text_ctx)[0]}  # fmt: skip
    stats = load_stats(folder, config.data.split) if model.scaling == "standardize" else None

    def init(rng):
        params = init_params(model, rng)
        if stats is not None:
            params = _replace_boxed(params, "clip_mean", stats["image_emb_mean"])
            params = _replace_boxed(params, "clip_std", stats["image_emb_std"])
        return params

    loss_fn = functools.partial(prior_loss, model=model,
                                table=diffusion.diffusion_from_config(config.diffusion),
                                text_drop=config.train.text_drop, null_text=null_text)  # fmt: skip

    def data(global_batch, process_index, process_count):
        keys = ("image_emb", "text_emb", "text_tokens", "text_mask")
        return _embedding_batches(config, global_batch, process_index, process_count, keys,
                                  text_ctx=model.text_ctx)  # fmt: skip

    source_of = functools.partial(data_source, config)
    sample = unclip_hooks.prior_sample(config, model, folder, source_of,
                                       null_text=null_text)  # fmt: skip
    return ModelKind(init=init, loss_fn=loss_fn, data=data, sample=sample)


def load_codec(workdir):
    """The AR prior's codec saved in a run (codec.npz)."""
    from unclip_jax.models.ar_prior import EmbeddingCodec

    path = storage.path(workdir) / "codec.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {workdir} an ar_prior run?")
    with np.load(io.BytesIO(path.read_bytes())) as data:
        return EmbeddingCodec.from_dict({k: data[k] for k in data.files})


def ar_prior_kind(config, workdir) -> ModelKind:
    """The AR prior; its codec is fitted on the side dataset's embeddings once per run."""
    from unclip_jax.data.embeddings import embedding_source
    from unclip_jax.models.ar_prior import ar_prior_from_config, fit_codec, init_inputs
    from unclip_jax.train.ar_prior import ar_prior_loss

    model = ar_prior_from_config(config.model, dtype=_dtype(config))
    path = storage.path(workdir) / "codec.npz"
    if path.exists():
        codec = load_codec(workdir)
    else:
        # All embeddings of the split in host memory (float64 PCA): fine to a few million; fit
        # on a subset (data.codec_examples) beyond that.
        source = embedding_source(_embeddings_dir(config), config.data.split)
        count = min(len(source), config.data.get("codec_examples", 1_000_000))
        records = [source[i] for i in range(count)]
        image = np.stack([r["image_emb"] for r in records]).astype(np.float64)
        text = np.stack([r["text_emb"] for r in records]).astype(np.float64)
        m = config.model
        codec, stats = fit_codec(image, text, n_components=m.n_components,
                                 n_buckets=m.n_buckets, n_dot_bins=m.n_dot_bins)  # fmt: skip
        log.info("fitted the AR prior's codec on %d embeddings: %s", count, stats)
        if jax.process_index() == 0:  # written whole, atomically (as the tokenizer)
            buffer = io.BytesIO()
            np.savez(buffer, **{k: np.asarray(v) for k, v in codec.to_dict().items()})
            storage.write_bytes(path, buffer.getvalue())

    def init(rng):
        return model.init(rng, *init_inputs(model, config.model.clip_dim))["params"]

    loss_fn = functools.partial(ar_prior_loss, model=model, codec=codec,
                                cond_drop=config.train.cond_drop)  # fmt: skip

    def data(global_batch, process_index, process_count):
        def rename(batch):  # the AR loss reads CLIP's token ids with their mask as "mask"
            batch["mask"] = batch.pop("text_mask")
            return batch

        keys = ("image_emb", "text_emb", "tokens", "text_mask")
        return _embedding_batches(config, global_batch, process_index, process_count, keys,
                                  text_ctx=model.text_ctx, post=rename)  # fmt: skip

    sample = unclip_hooks.ar_prior_sample(config, model, codec, _embeddings_dir(config),
                                          functools.partial(data_source, config))  # fmt: skip
    return ModelKind(init=init, loss_fn=loss_fn, data=data, sample=sample)


def decoder_kind(config, workdir=None) -> ModelKind:
    """The decoder on (source image, its CLIP embeddings); drops as the config says. A "glide"
    text pathway reads captions through the run's tokenizer (kinds.glide_tokenizer_for_run)."""
    from unclip_jax.data.embeddings import load_null_text
    from unclip_jax.models.decoder import decoder_from_config, init_params
    from unclip_jax.tokenizers import glide_tokenize
    from unclip_jax.train.kinds import glide_tokenizer_for_run
    from unclip_jax.train.unclip import loss_fn_from_config

    model = decoder_from_config(config.model, dtype=_dtype(config))
    folder = _embeddings_dir(config)
    glide = model.text is not None
    tokenizer = glide_tokenizer_for_run(config, workdir) if glide else None
    null_text = None
    if not glide:
        null = load_null_text(folder)
        null_text = {k: null[k] for k in ("text_emb", "text_tokens", "text_mask")}
    text_ctx = None if glide else null_text["text_mask"].shape[0]
    size = model.image_size

    def data(global_batch, process_index, process_count):
        keys = ["image", "image_emb"]
        keys += ["caption"] if glide else ["text_emb", "text_tokens", "text_mask"]
        tokenize = None
        if glide:

            def tokenize(batch):
                tokens, mask = glide_tokenize(tokenizer, [str(c) for c in batch.pop("caption")],
                                              model.text.text_ctx, config.model.text.pad_id,
                                              warn=False)  # fmt: skip
                return {**batch, "tokens": tokens, "mask": mask}

        return _embedding_batches(config, global_batch, process_index, process_count, keys,
                                  join_images=True, image_size=size, post=tokenize)  # fmt: skip

    def init(rng):
        return init_params(model, rng, text_ctx=text_ctx)

    source_of = functools.partial(data_source, config)
    sample = unclip_hooks.decoder_sample(config, model, folder, source_of,
                                         null_text=null_text, tokenizer=tokenizer)  # fmt: skip
    return ModelKind(init=init, loss_fn=loss_fn_from_config(config, model, null_text=null_text),
                     data=data, sample=sample)  # fmt: skip


def upsampler_kind(config) -> ModelKind:
    """An upsampler on source images at its target size (crops and degradations in the loss;
    BSR-style pairs, degradation "given", are made on the host)."""
    from unclip_jax.data import loader
    from unclip_jax.models.decoder import init_params, upsampler_from_config
    from unclip_jax.train.unclip import bsr_pairs_np, loss_fn_from_config

    model = upsampler_from_config(config.model, dtype=_dtype(config))
    given = config.train.degradation == "given"

    def data(global_batch, process_index, process_count):
        grain_loader = loader.make_loader(data_source(config), global_batch=global_batch,
                                          seed=config.seed, image_size=model.image_size,
                                          process_index=process_index,
                                          process_count=process_count,
                                          extra_keys=("index",) if given else ())  # fmt: skip

        def select(batch):
            image = np.asarray(batch["image"], np.float32)
            if not given:
                return {"image": image}
            crop = int(round(model.image_size * config.train.crop_fraction))
            scale = model.image_size // model.low_res_size
            # Seeded by the examples' indices: the same batch degrades the same way on resume.
            rng = np.random.default_rng([config.seed, *np.asarray(batch["index"]).tolist()])
            uint8 = np.round((image + 1) * 127.5).astype(np.uint8)
            return bsr_pairs_np(rng, uint8, crop, scale)

        return loader.MappedBatches(grain_loader, select)

    sample = unclip_hooks.upsampler_sample(config, model, functools.partial(data_source, config))
    return ModelKind(init=functools.partial(init_params, model),
                     loss_fn=loss_fn_from_config(config, model), data=data,
                     sample=sample)  # fmt: skip
