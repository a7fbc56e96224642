"""bfloat16 compute (DESIGN 1): matmuls and convolutions in bf16; norms, softmax and losses in
float32, for every model family: GLIDE's UNet and text transformer, the unCLIP decoder and
upsampler, the diffusion prior, the AR prior and CLIP. Checked on the traced program (jaxpr), so
that a norm statistic, a softmax max / exp / sum or a log-probability computed in bf16 anywhere
fails."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_glide_models import example_inputs
from test_prior import tiny_setup

from unclip_jax import config_utils, diffusion
from unclip_jax.models import ar_prior, clip, decoder, glide, prior

# Primitives that must see float32: norm statistics and softmax reductions, exp (softmax),
# rsqrt (norms), log / log1p (log-probabilities, losses).
FLOAT32_ONLY = ("reduce_sum", "reduce_max", "exp", "rsqrt", "log", "log1p")
BF16 = jnp.bfloat16


def primitive_dtypes(fn, *args) -> collections.Counter:
    """(primitive, first input's dtype) -> count over fn's jaxpr, sub-jaxprs included."""
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.invars and hasattr(eqn.invars[0].aval, "dtype"):
                counts[(eqn.primitive.name, eqn.invars[0].aval.dtype.name)] += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


def glide_case():
    config = config_utils.load_config("glide_base64:tiny")
    args, _ = example_inputs(config, batch=2)
    return glide.glide_from_config(config.model, dtype=BF16), tuple(args), {}


def decoder_case(spec):
    def build():
        config = config_utils.load_config(spec)
        kind = decoder.upsampler_from_config if "upsample" in spec else decoder.decoder_from_config
        model = kind(config.model, dtype=BF16)
        size = model.image_size
        cond = decoder.example_cond(model, 2, text_ctx=config.model.get("text_ctx"))
        cond = jax.tree.map(lambda a: a + 0.5 if a.dtype == jnp.float32 else a, cond)
        x = jnp.ones((2, size, size, 3))
        return model, (x, jnp.array([3, 700]), cond), {}

    return build


def prior_case():
    config, _, cond = tiny_setup(batch=2)
    model = prior.prior_from_config(config.model, dtype=BF16)
    x = jax.random.normal(jax.random.key(3), (2, model.clip_dim))
    return model, (x, jnp.array([3, 700]), cond), {}


def ar_prior_case():
    config = config_utils.load_config("prior_ar:tiny")
    model = ar_prior.ar_prior_from_config(config.model, dtype=BF16)
    return model, ar_prior.init_inputs(model, config.model.clip_dim, batch=2), {}


def clip_case():
    config = config_utils.load_config("clip_vit_l14:tiny")
    model = clip.clip_from_config(config.model, dtype=BF16)
    ids = jnp.ones((2, config.model.text.context_length), jnp.int32)
    size = model.vision.image_size
    images = jnp.zeros((2, size, size, 3))
    return model, (ids,), {"images": images}


CASES = {"glide": glide_case, "decoder": decoder_case("decoder64:tiny"),
         "upsampler": decoder_case("upsample256:tiny"), "prior": prior_case,
         "ar_prior": ar_prior_case, "clip": clip_case}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_matmuls_with_float32_norms_and_softmax(name):
    model, args, kwargs = CASES[name]()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    params = nn.meta.unbox(variables["params"])
    counts = primitive_dtypes(lambda p: model.apply({"params": p}, *args, **kwargs), params)
    bf16_products = sum(
        n
        for (prim, dt), n in counts.items()
        if prim in ("dot_general", "conv_general_dilated") and dt == "bfloat16"
    )
    assert bf16_products > 0, counts  # the compute dtype is in effect
    wrong = {k: n for k, n in counts.items() if k[0] in FLOAT32_ONLY and k[1] != "float32"}
    assert not wrong, f"{name}: reductions / exp / rsqrt / log outside float32: {wrong}"
    assert counts[("reduce_sum", "float32")] > 0 and counts[("exp", "float32")] > 0, counts


def test_losses_are_float32_from_bf16_outputs():
    """The diffusion losses take a bf16 network output and return float32 terms."""
    table = diffusion.create_diffusion("cosine", 1000, var_type="learned_range")
    x0 = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    noise = jax.random.normal(jax.random.key(1), x0.shape)

    def model_fn(x_t, t):
        return jnp.concatenate([x_t, jnp.tanh(x_t)], -1).astype(BF16)

    terms = diffusion.training_losses(table, model_fn, x0, jnp.array([0, 500]), noise)
    for key in ("loss", "mse", "vb"):
        assert terms[key].dtype == jnp.float32, key
        assert bool(jnp.all(jnp.isfinite(terms[key]))), key
    counts = primitive_dtypes(
        lambda x: diffusion.training_losses(table, model_fn, x, jnp.array([0, 500]), noise)["loss"],
        x0,
    )
    wrong = {k: n for k, n in counts.items() if k[0] in FLOAT32_ONLY and k[1] != "float32"}
    assert not wrong, wrong
    assert np.isfinite(float(terms["loss"].mean()))
