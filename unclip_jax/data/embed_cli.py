"""`unclip-jax data embed` and `data prepare`: the command-line side of the CLIP side dataset.

Kept apart from `data/embeddings.py` so that building the CLI parser imports nothing heavy: the
functions import jax, tfds and the models only when they run.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from unclip_jax import storage

log = logging.getLogger(__name__)

TOKEN_DTYPES = ("float32", "float16")  # embeddings.TOKEN_DTYPES (checked by embed_dataset)


def load_clip(
    *,
    config: str | None = None,
    checkpoint: str | None = None,
    hf: str | None = None,
    step: int | None = None,
    weights: str = "params",
    dtype: str | None = None,
) -> tuple[Any, Any, str]:
    """(model, params, description) from a Checkpointer run folder or a transformers folder.

    With `checkpoint`, the model comes from `config` (a config name) if given, else from the
    config saved with the checkpoint; its parameter tree must match the saved `weights`
    ("params" or "ema_params") key for key and shape.
    """
    import flax.linen as nn
    import jax
    import numpy as np

    from unclip_jax import config_utils
    from unclip_jax.models.clip import abstract_params, clip_from_config

    if (checkpoint is None) == (hf is None):
        raise ValueError("give exactly one of a CLIP checkpoint folder or a transformers folder")
    if hf is not None:
        from unclip_jax.convert.clip import load_hf_clip

        if config is not None:
            raise ValueError("a transformers folder carries its own config: drop the config name")
        model_cfg, params = load_hf_clip(hf)
        return clip_from_config(model_cfg, dtype=dtype), params, f"transformers {hf}"
    from unclip_jax.checkpoint import Checkpointer, split_run_path

    if not storage.path(checkpoint).is_dir():
        raise FileNotFoundError(f"CLIP checkpoint folder not found: {checkpoint}")
    # A run's workdir (its tokenizer/ sits beside), its checkpoints/ or one step of it.
    _, folder, named = split_run_path(checkpoint)
    step = named if step is None else step
    ckpt = Checkpointer(folder, enable_async=False)
    state, saved_config, _ = ckpt.restore(ckpt.checked_step(step))
    ckpt.close()
    if config is not None:
        model_cfg = config_utils.load_config(config).model
    elif "model" in saved_config:
        import ml_collections

        model_cfg = ml_collections.ConfigDict(saved_config["model"])
    else:
        raise ValueError(f"the checkpoint in {folder} saved no model config: name one")
    model = clip_from_config(model_cfg, dtype=dtype)
    if weights not in state:
        raise ValueError(f"the checkpoint holds no {weights!r}; it has {sorted(state)}")
    params = state[weights]
    want = {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_params(model)))
    }
    have = {
        jax.tree_util.keystr(k): tuple(np.shape(v))
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [
        f"{k}: config {want[k]} vs checkpoint {have[k]}"
        for k in sorted(set(want) & set(have))
        if want[k] != have[k]
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"the CLIP config {config or '(saved)'} does not match the weights in "
            f"{folder}: {'; '.join(problems[:5])}{more}"
        )
    return model, params, f"checkpoint {folder} step {step}"


def open_source(dataset: str, data_dir: str | None = None, validation_fraction: float = 0.0):
    """A tfds builder from `shapes[:config]`, `image_text:<folder>` (both prepared under
    `data_dir` if not there yet; `validation_fraction` of image_text's pairs, chosen by a hash of
    their keys, go to a `validation` split when it is first built) or the folder of a prepared
    tfds dataset."""
    kind, _, arg = dataset.partition(":")
    if kind in ("shapes", "image_text") and data_dir is None:
        raise ValueError(f"--data_dir is needed for {kind} (where it is built or found)")
    if kind == "shapes":
        from unclip_jax.data.shapes_builder import build_shapes

        return build_shapes(data_dir, arg or "default")
    if kind == "image_text":
        from unclip_jax.data.image_text import build_image_text

        if not arg:
            raise ValueError("image_text needs its folder: image_text:/path/to/pairs")
        return build_image_text(arg, data_dir, name=pathlib.Path(arg).name,
                                validation_fraction=validation_fraction)[0]  # fmt: skip
    if (storage.path(dataset) / "dataset_info.json").is_file():
        import tensorflow_datasets as tfds

        return tfds.builder_from_directory(str(storage.local_copy(dataset)))
    raise ValueError(
        f"unknown dataset {dataset!r}: shapes[:tiny|small|default], "
        "image_text:<folder>, or a prepared tfds dataset folder"
    )


def add_embed_arguments(parser) -> None:
    """The arguments of `unclip-jax data embed`."""
    add = parser.add_argument
    add(
        "--dataset",
        required=True,
        help="shapes[:tiny|small|default], image_text:<folder>, or a tfds dataset folder",
    )
    add("--data_dir", help="tfds folder where shapes / image_text are built or found")
    add("--split", default="train", help="source split to embed (default: train)")
    add("--out", required=True, help="the side dataset's folder (resumed if it holds one)")
    add(
        "--clip_config",
        help="CLIP config name, e.g. clip_vit_b32:tiny (default: the checkpoint's saved config)",
    )
    add("--clip_checkpoint", help="a CLIP training run (its workdir, or its checkpoints/)")
    add("--clip_step", type=int, help="checkpoint step (default: the latest)")
    add("--clip_weights", choices=("params", "ema_params"), default="params")
    add("--clip_hf", help="a transformers CLIP folder (config.json + model.safetensors)")
    add("--clip_dtype", help="compute dtype override, e.g. float32 (default: the config's)")
    add("--tokenizer", help="CLIPTokenizer folder (default: --clip_hf, or <checkpoint>/tokenizer)")
    add("--batch_size", type=int, default=256)
    add("--examples_per_shard", type=int, default=4096)
    add(
        "--token_dtype",
        choices=TOKEN_DTYPES,
        default="float32",
        help="dtype of the stored per-token text features",
    )
    add("--no_stats", action="store_true", help="skip the statistics of the split")


def run_embed(args):
    """`unclip-jax data embed`: load CLIP, tokenizer and source, then `embed_dataset` (returns
    its EmbedReport)."""
    from unclip_jax.checkpoint import run_folder
    from unclip_jax.data.embeddings import embed_dataset
    from unclip_jax.tokenizers import ClipTokenizer

    model, params, clip_desc = load_clip(
        config=args.clip_config,
        checkpoint=args.clip_checkpoint,
        hf=args.clip_hf,
        step=args.clip_step,
        weights=args.clip_weights,
        dtype=args.clip_dtype,
    )
    candidates = (
        [args.tokenizer]
        if args.tokenizer
        else [
            args.clip_hf,
            args.clip_checkpoint and str(run_folder(args.clip_checkpoint) / "tokenizer"),
        ]
    )
    folder = next((c for c in candidates if c and storage.path(c).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(
            f"no tokenizer folder among {[c for c in candidates if c]}: "
            "pass --tokenizer DIR (a CLIPTokenizer folder)"
        )
    tokenizer = ClipTokenizer.from_pretrained(folder, context_length=model.text.context_length)
    if tokenizer.vocab_size > model.text.vocab_size:
        raise ValueError(
            f"the tokenizer in {folder} has {tokenizer.vocab_size} ids, more than "
            f"the text tower's {model.text.vocab_size}"
        )
    log.info("embedding %s %s with CLIP from %s", args.dataset, args.split, clip_desc)
    return embed_dataset(
        open_source(args.dataset, args.data_dir),
        args.split,
        model,
        params,
        tokenizer,
        args.out,
        batch_size=args.batch_size,
        examples_per_shard=args.examples_per_shard,
        token_dtype=args.token_dtype,
        compute_stats=not args.no_stats,
    )
