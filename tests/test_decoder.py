"""unCLIP's decoder: Karlo/diffusers parity, strict import, sizes, sharding, training, null cond."""

import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from unclip_jax import config_utils, parallel
from unclip_jax.convert import common
from unclip_jax.convert.diffusers_unclip import load_diffusers_decoder
from unclip_jax.models.decoder import (
    UnclipDecoder,
    decoder_from_config,
    example_cond,
    init_params,
    make_model_fn,
    null_cond,
)
from unclip_jax.train import unclip as unclip_train
from unclip_jax.train.state import TrainState
from unclip_jax.train.step import make_train_step

HERE = pathlib.Path(__file__).parent / "fixtures"
FOLDER = HERE / "decoder_tiny"
DATA = np.load(HERE / "decoder_tiny.npz")


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(tree)))


@pytest.fixture(scope="module")
def converted():
    return load_diffusers_decoder(FOLDER)


def fixture_cond():
    # diffusers runs the guided batch as [uncond; cond]: the first half uses the learned null.
    b = DATA["image_emb"].shape[0]
    return {
        "image_emb": jnp.asarray(np.concatenate([DATA["image_emb"]] * 2)),
        "drop_image": jnp.asarray([True] * b + [False] * b),
        "text_emb": jnp.asarray(DATA["text_emb"]),
        "text_tokens": jnp.asarray(DATA["text_tokens"]),
        "text_mask": jnp.asarray(DATA["text_mask"]),
    }


def test_conditioning_and_output_match_diffusers(converted):
    decoder, params = converted
    n = int(DATA["num_params_text_proj"]) + int(DATA["num_params_decoder"])
    assert count(params) == n
    cond = fixture_cond()

    @jax.jit
    def run(params, x, t, cond):
        conditioning = decoder.apply({"params": params}, cond, method=UnclipDecoder.conditioning)
        return conditioning, decoder.apply({"params": params}, x, t, cond)

    (emb, context, mask), out = run(params, nhwc(DATA["sample"]), DATA["timesteps"], cond)
    # Absolute tolerances ~10x the measured errors (0 and 4.8e-7 on values up to 2.8).
    np.testing.assert_allclose(emb, DATA["emb"], rtol=0, atol=5e-6)
    np.testing.assert_allclose(context, DATA["context"], rtol=0, atol=5e-6)
    assert mask.shape == (4, 4 + DATA["text_mask"].shape[1]) and bool(mask[:, :4].all())
    err = float(jnp.max(jnp.abs(out - nhwc(DATA["out"]))))
    print(f"decoder vs diffusers: max abs {err:.2e}")
    assert err < 5e-5, err  # measured 5.4e-6


def test_renamed_key_and_wrong_shape_are_named(tmp_path):
    folder = tmp_path / "decoder_tiny"
    shutil.copytree(FOLDER, folder)
    path = folder / "text_proj" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["embedding_projx.weight"] = state.pop("embedding_proj.weight")
    state["learned_classifier_free_guidance_embeddings"] = np.zeros((5,), np.float16)
    save_file(state, str(path))
    with pytest.raises(common.ConversionError) as err:
        load_diffusers_decoder(folder)
    msg = str(err.value)
    assert "missing from checkpoint: text_proj.embedding_proj.weight" in msg
    assert "unexpected key in checkpoint: text_proj.embedding_projx.weight" in msg
    assert "shape mismatch: text_proj.learned_classifier_free_guidance_embeddings (5,)" in msg


def test_parameter_counts():
    def size(variant):
        model = decoder_from_config(config_utils.load_config(f"decoder64:{variant}").model)
        params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        return count(params["unet"]), count(params)

    unet, total = size("karlo")
    assert (unet, total) == (885_439_686, 893_318_086)  # diffusers' decoder + text_proj
    unet, total = size("paper")  # the paper says 3.5B
    assert (unet, total) == (2_238_164_486, 3_565_435_398)


def toy_batch(rng, batch=8, size=16, clip_dim=32, text_dim=64, ctx=16):
    """A coloured square whose colour is carried by the image embedding."""
    colors = rng.integers(0, 3, batch)
    images = np.full((batch, size, size, 3), -0.5, np.float32)
    emb = np.zeros((batch, clip_dim), np.float32)
    for i, c in enumerate(colors):
        images[i, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, c] = 0.8
        emb[i, c] = 1.0
    return {
        "image": jnp.asarray(images),
        "image_emb": jnp.asarray(emb),
        "text_emb": jnp.asarray(rng.normal(size=(batch, clip_dim)).astype(np.float32)),
        "text_tokens": jnp.asarray(rng.normal(size=(batch, ctx, text_dim)).astype(np.float32)),
        "text_mask": jnp.asarray(np.arange(ctx)[None] < rng.integers(2, ctx, (batch, 1))),
    }


@pytest.fixture(scope="module")
def tiny():
    # One level at 16 px with attention only in the middle block (which still reads the context
    # tokens) keeps compilation fast on CPU; the parity test covers the full structure.
    overrides = ["model.unet.image_size=16", "model.unet.attention_resolutions=''",
                 "model.unet.channel_mult=(1,)"]  # fmt: skip
    config = config_utils.load_config("decoder64:tiny", overrides)
    return config, decoder_from_config(config.model)


def paired_loss(step, state, batch):
    """The loss of state.params at the rng of step 0: the train step reports the loss before it
    updates, and folds the step number into the rng, so this compares params on the same draw."""
    _, metrics = step(state.replace(step=jnp.zeros((), jnp.int32)), batch, jax.random.key(1))
    return float(metrics["loss"])


@pytest.fixture(scope="module")
def trained(tiny):
    config, model = tiny
    null_text = {"text_emb": jnp.zeros(32), "text_tokens": jnp.zeros((16, 64)),
                 "text_mask": jnp.arange(16) < 2}  # fmt: skip
    loss_fn = unclip_train.loss_fn_from_config(config, model, null_text=null_text)
    params = nn.meta.unbox(jax.jit(lambda r: init_params(model, r))(jax.random.key(0)))
    tx = optax.adam(3e-3)
    step = jax.jit(make_train_step(loss_fn, tx, lambda s: 3e-3, ema_decay=0.9))
    batch = toy_batch(np.random.default_rng(0), batch=8)
    state = TrainState.create(params, tx)
    before = paired_loss(step, state, batch)
    for _ in range(8):
        state, metrics = step(state, batch, jax.random.key(1))
    return state, metrics, before, paired_loss(step, state, batch)


def test_train_steps_lower_the_loss(trained):
    state, metrics, before, after = trained
    assert set(metrics) >= {"loss", "mse", "vb", "grad_norm"}
    assert int(state.step) == 8 and after < 0.7 * before, (before, after)


def test_null_cond_and_caption_drops(tiny):
    config, model = tiny
    batch = toy_batch(np.random.default_rng(1), batch=4)
    cond = {k: v for k, v in batch.items() if k != "image"}
    null_text = {"text_emb": jnp.ones(32), "text_tokens": jnp.ones((16, 64)),
                 "text_mask": jnp.arange(16) < 2}  # fmt: skip
    null = null_cond(cond, null_text=null_text)
    assert bool(null["drop_image"].all()) and null["text_tokens"].shape == (4, 16, 64)
    assert bool((null["text_mask"].sum(-1) == 2).all())
    dropped = unclip_train.drop_clip_text(jax.random.key(0), cond, 1.0, null_text)
    np.testing.assert_array_equal(dropped["text_mask"], null["text_mask"])
    kept = unclip_train.drop_clip_text(jax.random.key(0), cond, 0.0, null_text)
    np.testing.assert_array_equal(kept["text_tokens"], cond["text_tokens"])
    glide = {"image_emb": cond["image_emb"], "tokens": jnp.ones((4, 16), jnp.int32),
             "mask": jnp.ones((4, 16), bool)}  # fmt: skip
    g_null = null_cond(glide, pad_id=256)
    assert bool((g_null["tokens"] == 256).all()) and not bool(g_null["mask"].any())


def test_glide_pathway_shapes():
    config = config_utils.load_config("decoder64:tiny_glide")
    model = decoder_from_config(config.model)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    assert {"text", "transformer_proj", "clip_emb", "clip_tok_proj", "cf_param"} <= set(abstract)
    cond = example_cond(model, 2)
    out = jax.eval_shape(make_model_fn(model), nn.meta.unbox(abstract), jnp.zeros((2, 32, 32, 3)),
                         jnp.zeros((2,), jnp.int32), cond)  # fmt: skip
    assert out.shape == (2, 32, 32, 6)
    # The loss traces on this pathway too (caption drop = GLIDE's empty token sequence).
    loss_fn = unclip_train.loss_fn_from_config(config, model)
    batch = dict(cond, image=jnp.zeros((2, 32, 32, 3)))
    loss, metrics = jax.eval_shape(loss_fn, nn.meta.unbox(abstract), batch, jax.random.key(0))
    assert loss.shape == () and {"mse", "vb"} <= set(metrics)


def test_fsdp_sharded_forward_equals_unsharded(tiny, trained):
    config, model = tiny
    mesh = parallel.create_mesh((("data", 4), ("fsdp", 2)))
    rules = parallel.rules_for("fsdp")
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    assert shardings["clip_tok_proj"]["kernel"].spec == P(None, "fsdp")
    assert shardings["text_seq_proj_1"]["scale"].spec == P(None)  # norms replicated
    assert shardings["unet"]["input_blocks_1_0"]["in_layers_2"]["kernel"].spec == P(
        None, None, None, "fsdp"
    )
    host_params = jax.tree.map(np.asarray, trained[0].params)  # trained: no zero inits left
    params = jax.device_put(host_params, nn.meta.unbox(shardings))
    kernel = params["clip_tok_proj"]["kernel"]
    assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2
    batch = toy_batch(np.random.default_rng(2), batch=8)
    cond = {k: v for k, v in batch.items() if k != "image"}
    cond["drop_image"] = jnp.arange(8) % 3 == 0
    x, t = batch["image"], jnp.arange(8, dtype=jnp.int32) * 100
    model_fn = jax.jit(make_model_fn(model))
    data = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = model_fn(params, *jax.device_put((x, t, cond), data))
    single = model_fn(host_params, x, t, cond)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)
