"""FSDP + tensor parallelism on a (data 2, fsdp 2, tensor 2) mesh of the 8 fake devices, for real
models: GLIDE's UNet with attention and its text transformer (glide_base64:tiny) and the diffusion
prior's transformer (prior_diffusion:tiny). The `fsdp_tp` rules put attention heads and MLP widths
on `tensor` and model widths on `fsdp`; the forward pass on the sharded params and batch equals the
single-device one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_glide_models import example_inputs
from test_prior import tiny_setup

from unclip_jax import config_utils, parallel
from unclip_jax.convert.common import flatten
from unclip_jax.models.glide import glide_from_config


def glide_case():
    config = config_utils.load_config("glide_base64:tiny")
    args, _ = example_inputs(config, batch=8)
    expected = {
        "params/unet/input_blocks_3_1/qkv/kernel": P("fsdp", "tensor"),  # heads split
        "params/unet/input_blocks_3_1/proj_out/kernel": P("tensor", "fsdp"),
        "params/unet/input_blocks_3_1/encoder_kv/kernel": P("fsdp", "tensor"),
        "params/text/transformer/resblocks_0/mlp/c_fc/kernel": P("fsdp", "tensor"),
        "params/text/transformer/resblocks_0/mlp/c_proj/kernel": P("tensor", "fsdp"),
        "params/unet/input_blocks_1_0/in_layers_2/kernel": P(None, None, None, "fsdp"),
        "params/unet/out_0/norm/scale": P(None),
    }
    return glide_from_config(config.model), tuple(args), expected


def prior_case():
    _, model, cond = tiny_setup(batch=8)
    x = jax.random.normal(jax.random.key(3), (8, model.clip_dim))
    t = jnp.arange(8) * 123 % 1000
    expected = {
        "params/transformer/resblocks_0/attn/c_qkv/kernel": P("fsdp", "tensor"),
        "params/transformer/resblocks_0/attn/c_proj/kernel": P("tensor", "fsdp"),
        "params/transformer/resblocks_0/mlp/c_fc/kernel": P("fsdp", "tensor"),
        "params/final_ln/scale": P(None),
    }
    return model, (x, t, cond), expected


@pytest.mark.parametrize("case", [glide_case, prior_case], ids=["glide_unet", "prior"])
def test_fsdp_tp_specs_and_sharded_forward_equal_unsharded(case):
    model, args, expected = case()
    mesh = parallel.create_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    rules = parallel.rules_for("fsdp_tp")
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    specs = flatten(jax.tree.map(lambda s: s.spec, shardings))
    for name, spec in expected.items():
        assert specs[name] == spec, name
    assert sum("tensor" in str(s) for s in specs.values()) >= 4

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(lambda r: model.init(r, *args), out_shardings=shardings)(
            jax.random.key(0)
        )
        params = nn.meta.unbox(variables)["params"]
        params = jax.tree.map(lambda p: p + 0.02, params)  # away from the zero inits
        qkv = next(k for k, s in specs.items() if s == P("fsdp", "tensor"))
        leaf = flatten({"params": params})[qkv]
        assert leaf.addressable_shards[0].data.shape == (leaf.shape[0] // 2, leaf.shape[1] // 2)
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        sharded_args = jax.tree.map(lambda a: jax.device_put(a, batch), args)
        sharded = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *sharded_args)
    host = jax.tree.map(np.asarray, params)
    single = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(host, *args)
    assert bool(jnp.all(jnp.isfinite(single)))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)
