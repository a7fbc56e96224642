"""The registry of model kinds the shared training loop can train.

A kind supplies `init(rng) -> boxed params`, `loss_fn(params, batch, rng) -> (loss, metrics)` and
`data(global_batch, process_index, process_count) -> iterator` of this process's NumPy batches
(global_batch // process_count examples) whose `get_state()`/`set_state()` (JSON-able) make the
data order resumable.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

from unclip_jax import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelKind:
    init: Callable
    loss_fn: Callable
    data: Callable
    # Optional: (global_batch, process_index, process_count) -> this process's held-out batches,
    # read afresh at every evaluation (train.eval_every).
    eval_data: Callable | None = None
    # Optional: (ema_params, rng) -> images [N, H, W, 3] in [-1, 1] or a hooks.SampleGrid
    # (train.sample_every).
    sample: Callable | None = None


KINDS = ("toy2d", "glide", "clip", "prior", "ar_prior", "decoder", "upsampler")


def get_kind(config, workdir=None) -> ModelKind:
    """The ModelKind named by config.kind (`workdir`: where a kind keeps run files such as the
    CLIP tokenizer or the AR prior's codec)."""
    from unclip_jax.train import unclip_kinds

    kind = config.get("kind")
    if kind == "toy2d":
        from unclip_jax.demo import toy2d

        return toy2d.model_kind(config)
    if kind == "glide":
        return glide_kind(config, workdir)
    if kind in ("clip", "ar_prior") and workdir is None:
        raise ValueError(f"a {kind!r} run keeps files in its workdir: pass workdir")
    if kind == "clip":
        return unclip_kinds.clip_kind(config, workdir)
    if kind == "prior":
        return unclip_kinds.prior_kind(config)
    if kind == "ar_prior":
        return unclip_kinds.ar_prior_kind(config, workdir)
    if kind == "decoder":
        return unclip_kinds.decoder_kind(config, workdir)
    if kind == "upsampler":
        return unclip_kinds.upsampler_kind(config)
    raise ValueError(f"unknown model kind {kind!r}; this version trains: {', '.join(KINDS)}")


_WARNED_NO_VALIDATION: set[str] = set()


def data_source(config, split: str | None = None):
    """The run's image-text data source of `split` (default: config.data.split).

    data.name "shapes": the procedural captioned shapes (data.config: tiny, small, default).
    data.name "image_text": the user's pairs at data.source (a folder of images with .txt
    captions, a CSV/parquet table or webdataset tar shards), built under data.dir on first use
    as `unclip-jax data prepare --dataset image_text:<source>` builds it. Without a validation
    split (prepared with --validation-fraction 0, the default), the held-out reads (eval loss,
    sample grids) take training examples, with a warning. Prepare the data before a multi-host
    launch: the builders have no cross-host lock, so hosts building at once would race.
    """
    name, split = config.data.name, split or config.data.split
    if name == "shapes":
        from unclip_jax.data import shapes_builder

        builder = shapes_builder.build_shapes(config.data.dir, config.data.config)
        return builder.as_data_source(split)
    if name != "image_text":
        raise ValueError(f"data.name {name!r}: expected 'shapes' or 'image_text'")
    from unclip_jax.data.image_text import build_image_text

    source = config.data.get("source", "")
    if not source:
        raise ValueError("data.name 'image_text' needs data.source: the folder, CSV/parquet table "
                         "or webdataset tar shards of your image-caption pairs")  # fmt: skip
    builder, _ = build_image_text(source, config.data.dir, name=pathlib.Path(source).name)
    if split not in builder.info.splits:
        if split != "validation":
            raise ValueError(f"image_text dataset {source} has no {split!r} split "
                             f"(has: {', '.join(sorted(builder.info.splits))})")  # fmt: skip
        if source not in _WARNED_NO_VALIDATION:
            _WARNED_NO_VALIDATION.add(source)
            log.warning("image_text dataset %s has no validation split (prepare it with "
                        "--validation-fraction): held-out metrics and sample grids read "
                        "training examples", source)  # fmt: skip
        split = "train"
    return builder.as_data_source(split)


def source_captions(source, count: int) -> list[str]:
    """The first `count` captions of a data source (bytes or str records), as str."""
    records = (source[i]["caption"] for i in range(min(len(source), count)))
    return [str(c, "utf-8") if isinstance(c, bytes) else str(c) for c in records]


def save_run_tokenizer(tokenizer, folder: pathlib.Path) -> None:
    """tokenizer.save into a run's `folder`, written beside and then renamed (process 0 only):
    another process, or a resume, that finds the folder finds it whole."""
    import jax

    if jax.process_index() == 0:
        storage.write_folder(folder, tokenizer.save)


def glide_tokenizer_for_run(config, workdir=None):
    """The tokenizer of a GLIDE run, by data.tokenizer: "bytes", or "gpt2_bpe" read from the
    run's tokenizer/ (a converted GLIDE run carries GPT-2's there, and so may a user), else from
    the tokenizer/ of ckpt.init_from (copied into the run), else learned: a GPT-2-style BPE on the
    first data.bpe_captions captions of the source (tokenizers.train_gpt2_bpe, at most
    model.text.vocab_size ids), kept in tokenizer/ for resumes and sampling. Errors if its ids do
    not fit the model's vocabulary or collide with model.text.pad_id."""
    from unclip_jax.checkpoint import run_folder
    from unclip_jax.tokenizers import ByteTokenizer, Gpt2BpeTokenizer, train_gpt2_bpe

    text, name = config.model.text, config.data.tokenizer
    if name == "bytes":
        tokenizer = ByteTokenizer()
    elif name == "gpt2_bpe":
        if workdir is None:
            raise ValueError("a GLIDE run with data.tokenizer 'gpt2_bpe' keeps its tokenizer in "
                             "its workdir: pass workdir")  # fmt: skip
        folder = storage.path(workdir) / "tokenizer"
        init_from = config.get("ckpt", {}).get("init_from")
        inherited = run_folder(init_from) / "tokenizer" if init_from else None
        if folder.is_dir():
            tokenizer = Gpt2BpeTokenizer.from_folder(folder)
        elif inherited is not None and inherited.is_dir():  # fine-tuning a converted run
            tokenizer = Gpt2BpeTokenizer.from_folder(inherited)
            save_run_tokenizer(tokenizer, folder)
        else:
            captions = source_captions(data_source(config), config.data.get("bpe_captions", 5000))
            tokenizer = train_gpt2_bpe(captions, text.vocab_size)
            save_run_tokenizer(tokenizer, folder)
            log.info("trained a %d-id GPT-2-style BPE on %d captions (no tokenizer/ in %s)",
                     tokenizer.vocab_size, len(captions), workdir)  # fmt: skip
    else:
        raise ValueError(f"unknown GLIDE tokenizer {name!r}: 'bytes' or 'gpt2_bpe'")
    if tokenizer.vocab_size > text.vocab_size:
        raise ValueError(f"the {name} tokenizer has {tokenizer.vocab_size} ids; the text "
                         f"transformer's vocab_size is {text.vocab_size}")  # fmt: skip
    if text.pad_id < tokenizer.vocab_size - 1 or text.pad_id >= text.vocab_size:
        raise ValueError(f"model.text.pad_id {text.pad_id} must be the tokenizer's last id "
                         f"({tokenizer.vocab_size - 1}) or an id above it below vocab_size "
                         f"{text.vocab_size}")  # fmt: skip
    return tokenizer


def glide_kind(config, workdir=None) -> ModelKind:
    """GLIDE base / inpaint / upsampler on a tfds dataset (config.data), captions tokenised
    (glide_tokenizer_for_run)."""
    import functools

    import jax.numpy as jnp

    from unclip_jax import diffusion
    from unclip_jax.data import loader
    from unclip_jax.models.glide import glide_from_config
    from unclip_jax.train.glide import glide_loss

    model = glide_from_config(config.model, dtype=jnp.dtype(config.model.get("dtype", "float32")))
    table = diffusion.diffusion_from_config(config.diffusion)
    text, size = config.model.text, config.model.unet.image_size
    tokenizer = glide_tokenizer_for_run(config, workdir)
    low = config.model.get("low_res_size")

    def init(rng):
        batch = 1
        extra = {}
        if low is not None:
            extra["low_res"] = jnp.zeros((batch, low, low, 3))
        return model.init(rng, jnp.zeros((batch, size, size, 3)), jnp.zeros((batch,), jnp.int32),
                          jnp.zeros((batch, text.text_ctx), jnp.int32),
                          jnp.ones((batch, text.text_ctx), bool), **extra)["params"]  # fmt: skip

    loss_fn = functools.partial(glide_loss, model=model, table=table,
                                caption_drop=config.train.caption_drop, pad_id=text.pad_id,
                                low_res_size=low)  # fmt: skip

    def batches(split, global_batch, process_index, process_count, **kw):
        grain_loader = loader.make_loader(
            data_source(config, split), global_batch=global_batch, seed=config.seed,
            image_size=size, process_index=process_index, process_count=process_count, **kw,
        )  # fmt: skip
        return loader.TokenizedBatches(grain_loader, tokenizer, text.text_ctx, text.pad_id)

    def data(global_batch, process_index, process_count):
        return batches(config.data.split, global_batch, process_index, process_count)

    def eval_data(global_batch, process_index, process_count):
        # The validation split in a fixed order (held-out loss, train.eval_every).
        return batches("validation", global_batch, process_index, process_count, shuffle=False)

    sample = None
    if low is None:  # base / inpaint models sample from captions alone
        from unclip_jax.pipelines.glide import GlideStage
        from unclip_jax.tokenizers import glide_tokenize

        prompts = list(config.train.get("sample_prompts", SAMPLE_PROMPTS))
        stage = GlideStage(model, None, config.diffusion)  # one model_fn: one compilation
        tokens, mask = glide_tokenize(tokenizer, prompts, text.text_ctx, text.pad_id, warn=False)
        null_tokens, null_mask = glide_tokenize(tokenizer, [""] * len(prompts), text.text_ctx,
                                                text.pad_id)  # fmt: skip
        scale = config.get("sample", {}).get("guidance_scale", 3.0)

        def sample(ema_params, rng):
            stage.params = ema_params
            return stage.sample({"tokens": tokens, "mask": mask}, rng,
                                respacing=config.train.get("sample_respacing", "25"),
                                null_cond={"tokens": null_tokens, "mask": null_mask},
                                guidance_scale=jnp.full((len(prompts),), scale))  # fmt: skip

    return ModelKind(init=init, loss_fn=loss_fn, data=data, eval_data=eval_data, sample=sample)


# Captions of the shapes grammar: two seen compositions and one held out (purple triangle).
SAMPLE_PROMPTS = ("a red circle", "a blue square to the left of a green triangle",
                  "a purple triangle")  # fmt: skip
