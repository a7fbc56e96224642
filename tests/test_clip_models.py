"""CLIP: parity with transformers, parameter counts, dtypes, input checks, sharding."""

import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax.config_utils import load_config
from unclip_jax.convert.clip import load_hf_clip
from unclip_jax.models.clip import (
    CLIP,
    CLIP_MEAN,
    CLIP_STD,
    TextConfig,
    VisionConfig,
    abstract_params,
    clip_from_config,
    count_params,
    dummy_inputs,
    l2_normalize,
    preprocess_images,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "clip"
OUT = np.load(FIXTURES / "outputs.npz")
ATOL = 1e-5


def _max_diff(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)))


def _check(name, ours, theirs):
    diff = _max_diff(ours, theirs)
    assert np.shape(ours) == theirs.shape, name
    assert diff < ATOL, f"{name}: max |ours - transformers| = {diff:.2e}"


# ------------------------------------------------------------------------------------------------
# Parity with transformers' PyTorch CLIP (fixtures from tests/fixtures/make_clip_fixtures.py).


def test_clip_model_parity():
    config, params = load_hf_clip(FIXTURES / "clip_model")
    model = clip_from_config(config)
    ids, images, mask = OUT["clip/input_ids"], OUT["clip/images"], OUT["clip/attention_mask"]
    # An all-ones key-padding mask is no mask: both cases share one compilation.
    apply = jax.jit(lambda m: model.apply({"params": params}, ids, images, attention_mask=m))
    out = apply(np.ones_like(mask))
    for name in ("text_embeds", "image_embeds", "text_hidden_states", "image_hidden_states",
                 "text_pooled", "image_pooled", "logits_per_text", "logits_per_image"):  # fmt: skip
        _check(name, getattr(out, name), OUT[f"clip/{name}"])
    # transformers' CLIPModel returns the normalised embeddings.
    for name in ("text_embeds", "image_embeds"):
        normalised = l2_normalize(getattr(out, name))
        _check(f"{name} (normalised)", normalised, OUT[f"clip/{name}_normalized"])
    # With the key-padding mask on top of the causal one (padded rows change, pooled ones not).
    masked = apply(mask)
    _check("masked text_hidden_states", masked.text_hidden_states,
           OUT["clip/masked_text_hidden_states"])  # fmt: skip
    _check("masked logits_per_text", masked.logits_per_text, OUT["clip/masked_logits_per_text"])


def test_text_model_with_projection_parity():
    """Exact GELU, argmax pooling (eos_token_id = 2 legacy), fewer tokens than the context."""
    config, params = load_hf_clip(FIXTURES / "clip_text_model")
    assert config.vision is None and config.text.eot_pooling == "argmax"
    model = clip_from_config(config)
    out = model.apply({"params": params}, OUT["text/input_ids"])
    assert out.image_embeds is None and out.logits_per_text is None
    _check("text_embeds", out.text_embeds, OUT["text/text_embeds"])
    _check("text_hidden_states", out.text_hidden_states, OUT["text/text_hidden_states"])


def test_vision_model_with_projection_parity():
    config, params = load_hf_clip(FIXTURES / "clip_vision_model")
    assert config.text is None and config.vision.activation == "gelu_new"
    model = clip_from_config(config)
    out = model.apply({"params": params}, images=OUT["vision/images"])
    _check("image_embeds", out.image_embeds, OUT["vision/image_embeds"])
    _check("image_hidden_states", out.image_hidden_states, OUT["vision/image_hidden_states"])


# ------------------------------------------------------------------------------------------------
# Parameter counts at full size, from shapes only.


@pytest.mark.parametrize("name", ["clip_vit_b32", "clip_vit_l14", "clip_vit_h16"])
def test_param_count_equals_transformers(name):
    reference = json.loads((FIXTURES / "param_counts.json").read_text())
    model = clip_from_config(load_config(name).model)
    assert count_params(model) == reference["clip_model_param_counts"][name]


def test_noised_clip_param_count():
    """GLIDE's noised ViT-B/64 = transformers' CLIPModel of that shape, with the class token
    (width) replaced by the timestep table (1000 x width)."""
    reference = json.loads((FIXTURES / "param_counts.json").read_text())
    config = load_config("noised_clip_b64").model
    with_class_token = reference["clip_model_param_counts"]["noised_clip_b64_with_class_token"]
    width = config.vision.width
    expected = with_class_token - width + config.vision.num_timesteps * width
    assert count_params(clip_from_config(config)) == expected == 158_138_625
    # GLIDE's released model keeps its logit scale fixed at 100 and normalises x_t itself.
    assert not config.learn_logit_scale and np.exp(config.logit_scale_init) == pytest.approx(100)
    assert config.vision.normalize_input and config.vision.activation == "gelu"


def test_preprocess_images_resizes_crops_and_normalises():
    images = np.zeros((2, 32, 48, 3), np.float32)
    images[:, :, 16:32] = 1.0  # a white centre band on black ([0, 1] images)
    out = np.asarray(preprocess_images(images, 16, value_range=(0.0, 1.0)))
    assert out.shape == (2, 16, 16, 3)
    # The short side becomes 16 (32x48 -> 16x24), the centre 16 columns are kept: the band
    # (columns 8..16 of 24) lands at columns 4..12 of the crop.
    white = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out[0, 8, 8], white, atol=1e-4)
    np.testing.assert_allclose(out[0, 8, 0], -np.array(CLIP_MEAN) / np.array(CLIP_STD), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes, input checks. Params are drawn with NumPy from the abstract shapes: compiling
# `init` (~80 threefry draws) costs seconds on CPU, and one test below does compile it.


def _tiny(num_timesteps=None, **kw):
    text = TextConfig(vocab_size=64, context_length=8, width=32, layers=2, heads=4, mlp_dim=64,
                      eos_token_id=63)  # fmt: skip
    vision = VisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=64,
                          num_timesteps=num_timesteps,
                          normalize_input=num_timesteps is not None)  # fmt: skip
    return CLIP(text=text, vision=vision, projection_dim=16, **kw)


def random_params(model, seed=0, std=0.1):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        value = rng.normal(0.0, std, leaf.shape).astype(np.float32)
        return value + 1.0 if path[-1].key == "scale" else value

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(model)))


def _inputs(model, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    length = model.text.context_length
    ids = rng.integers(1, 62, (batch, length)).astype(np.int32)
    ids[np.arange(batch), rng.integers(1, length, batch)] = 63  # an eos in every row
    v = model.vision
    images = rng.uniform(-1, 1, (batch, v.image_size, v.image_size, v.channels)).astype(np.float32)
    extra = {}
    if v.num_timesteps is not None:
        extra["timesteps"] = rng.integers(0, v.num_timesteps, batch).astype(np.int32)
    return ids, images, extra


TINY = _tiny()
TINY_PARAMS = random_params(TINY)


@jax.jit
def _apply_tiny(params, ids, images):
    return TINY.apply({"params": params}, ids, images)


def test_bf16_compute_keeps_float32_params_and_norms():
    bf16 = _tiny(dtype=jnp.bfloat16)
    abstract = nn.meta.unbox(abstract_params(bf16))
    assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype("float32")}
    ids, images, _ = _inputs(TINY)

    @jax.jit
    def run(params):
        return bf16.apply({"params": params}, ids, images, capture_intermediates=True)

    out, state = run(TINY_PARAMS)
    inter = state["intermediates"]["text_model"]["encoder"]["layers_0"]
    assert inter["self_attn"]["q_proj"]["__call__"][0].dtype == jnp.bfloat16  # matmuls in bf16
    assert inter["layer_norm1"]["__call__"][0].dtype == jnp.float32  # norms in float32
    assert inter["__call__"][0].dtype == jnp.float32  # the residual stream too
    ref = _apply_tiny(TINY_PARAMS, ids, images)
    for name in ("text_embeds", "image_embeds", "text_hidden_states", "logits_per_text"):
        ours = getattr(out, name)
        assert ours.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(ours))), name
        scale = float(jnp.max(jnp.abs(getattr(ref, name))))
        assert _max_diff(ours, np.asarray(getattr(ref, name))) < 0.05 * scale, name
    assert out.text_hidden_states.shape == (8, 8, 32)
    assert out.image_hidden_states.shape == (8, 17, 32)
    assert out.logits_per_image.shape == (8, 8)


def test_logit_scale_clamped_and_fixable():
    ids, images, _ = _inputs(TINY)
    params = dict(TINY_PARAMS, logit_scale=np.float32(np.log(1000.0)))
    out = _apply_tiny(params, ids, images)
    assert float(out.logit_scale) == 100.0
    scale = float(jnp.exp(TINY_PARAMS["logit_scale"]))
    np.testing.assert_allclose(float(_apply_tiny(TINY_PARAMS, ids, images).logit_scale), scale)

    fixed = _tiny(learn_logit_scale=False)

    @jax.jit
    @jax.grad
    def grad_of_scale(log_scale):
        p = dict(TINY_PARAMS, logit_scale=log_scale)
        return fixed.apply({"params": p}, ids, images).logits_per_text.sum()

    assert float(grad_of_scale(np.float32(1.0))) == 0.0


def test_remat_recomputes_and_gives_the_same_grads():
    text = TextConfig(vocab_size=64, context_length=8, width=16, layers=1, heads=2, mlp_dim=32,
                      eos_token_id=63)  # fmt: skip
    plain, remat = (CLIP(text=text, vision=None, projection_dim=8, remat=r) for r in (False, True))
    params = random_params(plain)
    ids, _, _ = _inputs(TINY, batch=2)

    def grad_fn(model):
        def loss(p):
            return jnp.sum(model.apply({"params": p}, ids).text_embeds ** 2)

        return jax.grad(loss)

    # jax.checkpoint shows up as the remat2 primitive; only the remat model has it.
    assert "remat2" in str(jax.make_jaxpr(grad_fn(remat))(params))
    assert "remat2" not in str(jax.make_jaxpr(grad_fn(plain))(params))
    g_plain, g_remat = jax.jit(grad_fn(plain))(params), jax.jit(grad_fn(remat))(params)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g_plain, g_remat)
    assert max(jax.tree.leaves(diffs)) < 1e-6


def test_bad_inputs_are_named():
    ids, images, _ = _inputs(TINY, batch=2)
    apply = functools.partial(TINY.apply, {"params": TINY_PARAMS})
    with pytest.raises(ValueError, match="NHWC"):
        apply(ids, images[:, :8])
    with pytest.raises(ValueError, match="context length"):
        apply(np.zeros((2, 9), np.int32))
    with pytest.raises(ValueError, match="takes no timesteps"):
        apply(images=images, timesteps=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="give input_ids, images or both"):
        apply()
    noised = _tiny(num_timesteps=10)
    with pytest.raises(ValueError, match="needs timesteps"):
        jax.eval_shape(functools.partial(noised.init, images=images), jax.random.key(0))
    text_only = CLIP(text=TINY.text, vision=None, projection_dim=16)
    with pytest.raises(ValueError, match="no image tower"):
        jax.eval_shape(functools.partial(text_only.init, input_ids=ids, images=images),
                       jax.random.key(0))  # fmt: skip
    config = load_config("clip_vit_b32:tiny").model
    config.unlock()
    config.text.heads = 5
    with pytest.raises(ValueError, match="not divisible"):
        clip_from_config(config)
    config.text.heads = 4
    config.vision.activation = "relu6"
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        clip_from_config(config)


def test_noise_aware_tower_uses_the_timestep():
    model = _tiny(num_timesteps=50)
    params = random_params(model)
    assert "class_embedding" not in params["vision_model"]["embeddings"]
    assert params["vision_model"]["embeddings"]["timestep_embedding"]["embedding"].shape == (50, 32)
    _, images, _ = _inputs(model, batch=2)
    embed = jax.jit(lambda t: model.apply({"params": params}, images=images, timesteps=t))
    a = embed(np.array([0, 0], np.int32)).image_embeds
    b = embed(np.array([0, 49], np.int32)).image_embeds
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert _max_diff(a[1], np.asarray(b[1])) > 1e-3


# ------------------------------------------------------------------------------------------------
# Sharding on a (data=4, fsdp=2) mesh.


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


RULES = (
    ("batch", "data"),
    ("embed", "fsdp"),
    ("mlp", "data"),
    ("heads", "data"),
    ("vocab", "data"),
)


def test_sharding_specs_and_sharded_forward_equals_unsharded():
    model = _tiny(num_timesteps=1000)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    abstract = abstract_params(model)
    # Every parameter carries logical names (the 0-d logit scale has the empty tuple).
    boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    ids, images, extra = _inputs(model)
    inputs = dict(input_ids=ids, images=images, **extra)

    def init(rng):
        return model.init(rng, **dummy_inputs(model))["params"]

    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        # Sharded from birth. (An rbg key: the same sharded init compiles 2-3x faster on CPU.)
        params = jax.jit(init, out_shardings=shardings)(jax.random.key(0, impl="unsafe_rbg"))
        expect = {
            "text_model/embeddings/token_embedding/embedding": P("data", "fsdp"),
            "text_model/encoder/layers_0/self_attn/q_proj/kernel": P("fsdp", "data"),
            "text_model/encoder/layers_0/self_attn/q_proj/bias": P("data"),
            "text_model/encoder/layers_1/self_attn/out_proj/kernel": P("data", None, "fsdp"),
            "vision_model/encoder/layers_0/mlp/fc1/kernel": P("fsdp", "data"),
            "vision_model/encoder/layers_0/mlp/fc2/kernel": P("data", "fsdp"),
            "vision_model/embeddings/patch_embedding/kernel": P(None, None, None, "fsdp"),
            "vision_model/embeddings/timestep_embedding/embedding": P(None, "fsdp"),
            "vision_model/pre_layernorm/scale": P(),
            "visual_projection/kernel": P("fsdp"),
        }
        for path, spec in expect.items():
            value = _get(params, path).value
            assert value.sharding.is_equivalent_to(NamedSharding(mesh, spec), value.ndim), path
        batch = NamedSharding(mesh, P("data"))
        apply = jax.jit(lambda p, x: model.apply({"params": p}, **x))
        sharded = apply(params, jax.device_put(inputs, batch))
    assert sharded.text_hidden_states.sharding.spec[0] == "data"
    unboxed = jax.device_get(nn.meta.unbox(params))
    single = apply(unboxed, inputs)
    for name in ("text_embeds", "image_embeds", "text_hidden_states", "logits_per_text"):
        np.testing.assert_allclose(getattr(sharded, name), getattr(single, name), atol=1e-5)
