"""GLIDE's UNets: released parameter counts, every tiny variant's forward pass, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unclip_jax import config_utils, parallel
from unclip_jax.convert.common import flatten
from unclip_jax.models.glide import glide_from_config


def example_inputs(config, batch=2, seed=0):
    u, t = config.model.unet, config.model.text
    k = jax.random.split(jax.random.key(seed), 4)
    size = u.image_size
    tokens = jax.random.randint(k[0], (batch, t.text_ctx), 0, t.vocab_size - 1)
    lengths = jnp.where(jnp.arange(batch) % 2 == 0, t.text_ctx // 2, t.text_ctx)
    mask = jnp.arange(t.text_ctx)[None] < lengths[:, None]
    kwargs = {}
    if "upsample" in config.model.mode:
        low = config.model.low_res_size
        kwargs["low_res"] = jax.random.uniform(k[1], (batch, low, low, 3), minval=-1, maxval=1)
    if "inpaint" in config.model.mode:
        kwargs["inpaint_image"] = jax.random.uniform(k[2], (batch, size, size, 3), minval=-1)
        kwargs["inpaint_mask"] = (jax.random.uniform(k[3], (batch, size, size, 1)) > 0.5) * 1.0
    x = jax.random.normal(k[1], (batch, size, size, 3))
    timesteps = jnp.arange(batch) * 997 % 1000
    return (x, timesteps, tokens, mask), kwargs


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in flatten(tree).values())


@pytest.mark.parametrize(
    "spec,expected",
    [("glide_base64", 385_030_726), ("glide_inpaint64", 385_037_638),
     ("glide_upsample256", 398_361_286), ("glide_upsample256:inpaint", 398_368_198)],
)  # fmt: skip
def test_released_parameter_counts(spec, expected):
    config = config_utils.load_config(spec)
    model = glide_from_config(config.model)
    args, kwargs = example_inputs(config, batch=1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    assert count(shapes) == expected


def test_paper_base_is_3_5B_split_as_the_paper_says():
    config = config_utils.load_config("glide_base64:paper")
    model = glide_from_config(config.model)
    args, _ = example_inputs(config, batch=1)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
    text = count({k: v for k, v in params.items() if k == "text"})
    total = count(params)
    assert 3.5e9 < total < 3.6e9  # "3.5 billion parameters"
    assert 2.2e9 < total - text < 2.3e9 and 1.2e9 < text < 1.35e9  # SPEC 2.3: 2.24B + 1.32B


@pytest.mark.parametrize(
    "spec", ["glide_base64:tiny", "glide_inpaint64:tiny", "glide_upsample256:tiny",
             "glide_upsample256:tiny_inpaint"],
)  # fmt: skip
def test_tiny_variants_forward(spec):
    config = config_utils.load_config(spec)
    args, kwargs = example_inputs(config)
    model = glide_from_config(config.model)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), *args, **kwargs))["params"]
    # Zero-initialised output convs make a fresh model output zeros; perturb to test the path.
    params = jax.tree.map(lambda p: p + 0.02 * jnp.ones_like(p), params)
    out = jax.jit(model.apply)({"params": params}, *args, **kwargs)
    size = config.model.unet.image_size
    assert out.shape == (2, size, size, 6) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    # bf16 compute: the same params (float32), a bf16 forward close to the float32 one.
    if spec != "glide_base64:tiny":
        return  # one variant is enough for the dtype policy (each compile costs seconds)
    bf16 = glide_from_config(config.model, dtype=jnp.bfloat16)
    bf16_params = jax.eval_shape(lambda: bf16.init(jax.random.key(1), *args, **kwargs))
    assert {p.dtype for p in flatten(bf16_params).values()} == {jnp.dtype(jnp.float32)}
    out16 = jax.jit(bf16.apply)({"params": params}, *args, **kwargs)
    assert out16.dtype == jnp.float32
    err = float(jnp.abs(out16 - out).max() / jnp.abs(out).max())
    assert err < 0.05, err


def test_mode_and_input_errors_are_named():
    config = config_utils.load_config("glide_inpaint64:tiny")
    args, kwargs = example_inputs(config)
    model = glide_from_config(config.model)
    with pytest.raises(ValueError, match=r"inpainting needs image \(2, 16, 16, 3\)"):
        model.init(jax.random.key(0), *args, inpaint_image=jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"tokens and mask of shape \[B, 16\]"):
        model.init(jax.random.key(0), args[0], args[1], args[2][:, :5], args[3][:, :5], **kwargs)
    up = config_utils.load_config("glide_upsample256:tiny")
    up_args, _ = example_inputs(up)
    with pytest.raises(ValueError, match="needs the low-resolution image"):
        glide_from_config(up.model).init(jax.random.key(0), *up_args)


def test_fsdp_sharding_specs_and_sharded_forward_equal_unsharded():
    config = config_utils.load_config("glide_base64:tiny")
    args, _ = example_inputs(config, batch=8)
    model = glide_from_config(config.model)
    mesh = parallel.create_mesh((("data", 4), ("fsdp", 2)))
    rules = parallel.rules_for("fsdp")
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    specs = flatten(jax.tree.map(lambda s: s.spec, shardings))
    assert specs["params/unet/input_blocks_1_0/in_layers_2/kernel"] == P(None, None, None, "fsdp")
    assert specs["params/unet/input_blocks_3_1/qkv/kernel"] == P("fsdp", None)
    assert specs["params/text/token_embedding/embedding"] == P(None, "fsdp")
    assert specs["params/unet/out_0/norm/scale"] == P(None)  # norms replicated

    def init(rng):
        return model.init(rng, *args)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        kernel = variables["params"]["unet"]["input_blocks_1_0"]["in_layers_2"]["kernel"].value
        assert kernel.sharding.spec == P(None, None, None, "fsdp")
        assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2
        params = nn.meta.unbox(variables)["params"]
        params = jax.tree.map(lambda p: p + 0.02, params)  # away from the zero inits
        batch = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
        sharded_args = [jax.device_put(a, batch) for a in args]
        sharded = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *sharded_args)
    host_params = jax.tree.map(np.asarray, params)
    single = jax.jit(model.apply)({"params": host_params}, *args)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)


def test_remat_is_switched_by_the_config():
    config = config_utils.load_config("glide_base64:tiny", ["model.remat=True"])
    args, _ = example_inputs(config)
    plain = glide_from_config(config_utils.load_config("glide_base64:tiny").model)
    params = jax.eval_shape(lambda: plain.init(jax.random.key(0), *args))

    def loss(model, p):
        return jnp.sum(model.apply(p, *args))

    def grad_jaxpr(model):
        return str(jax.make_jaxpr(jax.grad(lambda p: loss(model, p)))(params))

    assert "remat" in grad_jaxpr(glide_from_config(config.model))  # jax.checkpoint
    assert "remat" not in grad_jaxpr(plain)
