"""The registry of model kinds the shared training loop can train.

A kind supplies `init(rng) -> boxed params`, `loss_fn(params, batch, rng) -> (loss, metrics)` and
`data(global_batch, process_index, process_count) -> iterator` of this process's NumPy batches
(global_batch // process_count examples) whose `get_state()`/`set_state()` (JSON-able) make the
data order resumable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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
        return glide_kind(config)
    if kind in ("clip", "ar_prior") and workdir is None:
        raise ValueError(f"a {kind!r} run keeps files in its workdir: pass workdir")
    if kind == "clip":
        return unclip_kinds.clip_kind(config, workdir)
    if kind == "prior":
        return unclip_kinds.prior_kind(config)
    if kind == "ar_prior":
        return unclip_kinds.ar_prior_kind(config, workdir)
    if kind == "decoder":
        return unclip_kinds.decoder_kind(config)
    if kind == "upsampler":
        return unclip_kinds.upsampler_kind(config)
    raise ValueError(f"unknown model kind {kind!r}; this version trains: {', '.join(KINDS)}")


def glide_kind(config) -> ModelKind:
    """GLIDE base / inpaint / upsampler on a tfds dataset (config.data), captions tokenised."""
    import functools

    import jax.numpy as jnp

    from unclip_jax import diffusion
    from unclip_jax.data import loader, shapes_builder
    from unclip_jax.models.glide import glide_from_config
    from unclip_jax.tokenizers import ByteTokenizer
    from unclip_jax.train.glide import glide_loss

    model = glide_from_config(config.model, dtype=jnp.dtype(config.model.get("dtype", "float32")))
    table = diffusion.diffusion_from_config(config.diffusion)
    text, size = config.model.text, config.model.unet.image_size
    if config.data.tokenizer != "bytes":
        raise ValueError(f"data.tokenizer {config.data.tokenizer!r}: only 'bytes' is wired up "
                         "for training so far")  # fmt: skip
    tokenizer = ByteTokenizer()
    if text.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"a byte tokenizer needs vocab_size >= 257, the model has "
                         f"{text.vocab_size}")  # fmt: skip
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
        if config.data.name != "shapes":
            raise ValueError(f"data.name {config.data.name!r}: only 'shapes' is wired up so far")
        builder = shapes_builder.build_shapes(config.data.dir, config.data.config)
        grain_loader = loader.make_loader(
            builder.as_data_source(split), global_batch=global_batch, seed=config.seed,
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
