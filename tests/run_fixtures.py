"""Tiny run folders with random (untrained) weights, for tests of the pipelines and evaluation.

`make_random_runs(root)` writes, in seconds and without any training, the run folders that
`unclip-jax train` would leave behind for the tiny configs: a checkpoint of a TrainState (params,
EMA params, optimizer state) with the config JSON beside it, saved through the same Checkpointer,
plus the run files the pipelines read (CLIP's tokenizer/ folder, the AR prior's codec.npz). The
pipeline builders (pipelines/unclip.pipeline_from_runs, pipelines/glide.pipeline_from_runs) load
them as they load trained runs. The samples are noise-like; use these runs to test mechanics.

    @pytest.fixture(scope="module")
    def runs(tmp_path_factory):
        return make_random_runs(tmp_path_factory.mktemp("runs"))
"""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import config_utils
from unclip_jax.checkpoint import Checkpointer
from unclip_jax.train.state import TrainState, make_optimizer

# run name -> config spec; the order is the order of creation.
CONFIGS = {
    "clip": "clip_vit_b32:tiny",
    "prior": "prior_diffusion:tiny",
    "ar_prior": "prior_ar:tiny",
    "decoder": "decoder64:tiny",
    "upsampler": "upsample256:tiny",
    "glide_base": "glide_base64:tiny",
}


def shapes_captions(count: int = 300, split: str = "train") -> list[str]:
    """The captions of the first `count` examples of a shapes split."""
    from unclip_jax.data import shapes

    return [shapes.render_example(split, i).caption for i in range(count)]


def _init_fn(name: str, config):
    """(init(rng) -> boxed params) for a run of the tiny configs (the model kinds' inits)."""
    m = config.model
    if name == "clip":
        from unclip_jax.models.clip import clip_from_config, init_params

        model = clip_from_config(m)
        return lambda rng: init_params(model, rng)
    if name == "prior":
        from unclip_jax.models.prior import init_params, prior_from_config

        model = prior_from_config(m)
        return lambda rng: init_params(model, rng)
    if name == "ar_prior":
        from unclip_jax.models.ar_prior import ar_prior_from_config, init_inputs

        model = ar_prior_from_config(m)
        return lambda rng: model.init(rng, *init_inputs(model, m.clip_dim))["params"]
    if name in ("decoder", "upsampler"):
        from unclip_jax.models import decoder

        if name == "decoder":
            model = decoder.decoder_from_config(m)
            # The "clip" text pathway's context is CLIP's (the side dataset's null text length).
            kw = {} if model.text is not None else {"text_ctx": m.get("text_ctx", 77)}
        else:
            model, kw = decoder.upsampler_from_config(m), {}
        return lambda rng: decoder.init_params(model, rng, **kw)
    if name == "glide_base":
        from unclip_jax.train.kinds import glide_kind

        return glide_kind(config).init  # touches no data until its data() is called
    raise ValueError(f"no random run for {name!r}; known: {sorted(CONFIGS)}")


def random_params(init, seed: int = 0):
    """Params with init's tree, shapes and dtypes, drawn in NumPy without running init.

    Compiling a model's init takes seconds even for the tiny configs; tracing it for shapes
    (jax.eval_shape) does not. Leaves are filled by name: "scale"/"*std" ones, "bias"/"*mean"
    zeros, kernels N(0, 1/fan_in), anything else (embeddings, null vectors) N(0, 0.02^2). Unlike
    a real init, no output layer is zero, so samples depend on the conditioning.
    """
    abstract = nn.meta.unbox(jax.eval_shape(init, jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        shape, dtype = leaf.shape, leaf.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            return np.zeros(shape, dtype)
        if name == "scale" or name.endswith("std"):
            return np.ones(shape, dtype)
        if name == "bias" or name.endswith("mean"):
            return np.zeros(shape, dtype)
        if name == "kernel" and len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
        return (0.02 * rng.standard_normal(shape)).astype(dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _train_state(params, tx) -> TrainState:
    """TrainState.create(params, tx) without compiling it: Adam's moments, the step, the skip
    counter and every optimizer count start at zero, so zeros of the eval_shape'd state are it."""
    abstract = jax.eval_shape(lambda p: TrainState.create(p, tx), params)
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    return state.replace(params=params, ema_params=jax.tree.map(np.copy, params))


def save_random_run(workdir, config, init, *, seed: int = 0, step: int = 0,
                    exact_init: bool = False) -> str:  # fmt: skip
    """Write workdir/checkpoints/<step> as train() would: a TrainState (params, EMA params,
    optimizer state) of random params, with the config JSON. `exact_init` runs the model's own
    init (jitted: slower to compile) instead of `random_params`."""
    tx, _ = make_optimizer(config.optim)
    if exact_init:
        params = jax.device_get(jax.jit(lambda rng: nn.meta.unbox(init(rng)))(jax.random.key(seed)))
    else:
        params = random_params(init, seed)
    state = jax.device_put(_train_state(params, tx))
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", enable_async=False)
    try:
        ckpt.save(step, state, config=json.loads(config.to_json()), data_state={}, force=True)
    finally:
        ckpt.close()
    return str(workdir)


def make_random_runs(root, *, names=tuple(CONFIGS), captions: int = 300,
                     exact_init: bool = False) -> dict[str, str]:  # fmt: skip
    """Random-weight tiny runs under `root` (one folder per name); returns name -> folder.

    Names: clip (with tokenizer/, a BPE trained on `captions` shapes captions), prior, ar_prior
    (with codec.npz fitted on random embeddings), decoder, upsampler, glide_base. Params come
    from `random_params` (fast) or, with exact_init, from each model's own jitted init.
    """
    root = pathlib.Path(root)
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise ValueError(f"unknown run names {sorted(unknown)}; known: {sorted(CONFIGS)}")
    out = {}
    for i, name in enumerate(names):
        config = config_utils.load_config(CONFIGS[name])
        workdir = root / name
        if name == "clip":
            from unclip_jax.tokenizers import train_bpe

            text = config.model.text
            tokenizer = train_bpe(shapes_captions(captions), vocab_size=text.vocab_size,
                                  context_length=text.context_length)  # fmt: skip
            tokenizer.save(workdir / "tokenizer")
        if name == "ar_prior":
            from unclip_jax.models.ar_prior import fit_codec

            m = config.model
            rng = np.random.default_rng(i)
            image = rng.standard_normal((4 * m.n_buckets, m.clip_dim))
            text = image + 0.5 * rng.standard_normal(image.shape)
            codec, _ = fit_codec(image, text, n_components=m.n_components,
                                 n_buckets=m.n_buckets, n_dot_bins=m.n_dot_bins)  # fmt: skip
            workdir.mkdir(parents=True, exist_ok=True)
            # As train/unclip_kinds.ar_prior_kind saves it.
            np.savez(workdir / "codec.npz", **{k: np.asarray(v) for k, v in
                                               codec.to_dict().items()})  # fmt: skip
        out[name] = save_random_run(workdir, config, _init_fn(name, config), seed=i,
                                    exact_init=exact_init)  # fmt: skip
    return out


def final_params(workdir):
    """(latest step, params as NumPy, data-iterator state) of a run folder (local or gs://)."""
    ckpt = Checkpointer(f"{workdir}/checkpoints", enable_async=False)
    step = ckpt.latest_step()
    state, _, data = ckpt.restore(step)
    ckpt.close()
    return step, jax.tree.map(np.asarray, state["params"]), data


def assert_identical_runs(a, b):
    """Two runs ended at the same step with the same data state and bit-identical params (a
    resumed run against an uninterrupted one); returns (step, data state)."""
    step_a, params_a, data_a = final_params(a)
    step_b, params_b, data_b = final_params(b)
    assert step_a == step_b and data_a == data_b, (step_a, step_b, data_a, data_b)
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(x, y)
    return step_a, data_a
