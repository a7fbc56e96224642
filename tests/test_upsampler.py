"""unCLIP's attention-free upsamplers: UNet2DModel parity, sizes, conditioning, training."""

import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

from unclip_jax import config_utils
from unclip_jax.convert import common
from unclip_jax.convert.diffusers_unclip import load_diffusers_upsampler
from unclip_jax.data import transforms
from unclip_jax.models.decoder import init_params, make_model_fn, upsampler_from_config
from unclip_jax.train import unclip as unclip_train
from unclip_jax.train.state import TrainState
from unclip_jax.train.step import make_train_step

HERE = pathlib.Path(__file__).parent / "fixtures"
FOLDER = HERE / "upsampler_tiny"
DATA = np.load(HERE / "upsampler_tiny.npz")


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def test_output_matches_diffusers_unet2dmodel():
    model, params = load_diffusers_upsampler(FOLDER)
    assert count(params) == int(DATA["num_params"])
    assert model.unet.attention_ds == () and not model.unet.middle_attention
    assert not model.unet.use_scale_shift_norm
    # The pipeline's bicubic + antialias upsampling is what the model does to low_res.
    up = jax.image.resize(nhwc(DATA["low_res"]), (2, 16, 16, 3), model.resize)
    np.testing.assert_allclose(up, nhwc(DATA["upscaled"]), atol=1e-5)
    out = jax.jit(make_model_fn(model))(params, nhwc(DATA["sample"]), DATA["timesteps"],
                                        {"low_res": nhwc(DATA["low_res"])})  # fmt: skip
    err = float(jnp.max(jnp.abs(out - nhwc(DATA["out"]))))
    print(f"upsampler vs diffusers: max abs {err:.2e}")
    assert err < 4e-5, err  # measured 4.1e-6


def test_renamed_key_and_wrong_shape_are_named(tmp_path):
    folder = tmp_path / "sr"
    shutil.copytree(FOLDER, folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["up_blocks.0.resnets.0.conv_shortcutx.weight"] = state.pop(
        "up_blocks.0.resnets.0.conv_shortcut.weight"
    )
    state["conv_in.weight"] = np.zeros((32, 3, 3, 3), np.float16)
    save_file(state, str(path))
    with pytest.raises(common.ConversionError) as err:
        load_diffusers_upsampler(folder)
    msg = str(err.value)
    assert "missing from checkpoint: up_blocks.0.resnets.0.conv_shortcut.weight" in msg
    assert "unexpected key in checkpoint: up_blocks.0.resnets.0.conv_shortcutx.weight" in msg
    assert "shape mismatch: conv_in.weight (32, 3, 3, 3)" in msg


def size(name):
    model = upsampler_from_config(config_utils.load_config(name).model)
    return count(jax.eval_shape(lambda: init_params(model, jax.random.key(0))))


def test_parameter_counts():
    assert size("upsample256:karlo") == 691_579_523  # each of diffusers' super_res_first/_last
    assert size("upsample256:paper") == 691_579_523  # the paper says 700M
    assert size("upsample1024:paper") == 267_146_691  # the paper says 300M


def test_conditioning_pairs():
    config = config_utils.load_config("upsample256:tiny")
    model = upsampler_from_config(config.model)
    images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
    crop, low = unclip_train.upsampler_pair(jax.random.key(1), images, model=model)
    assert crop.shape == (2, 16, 16, 3) and low.shape == (2, 4, 4, 3)  # 1/4 of the side, / 4
    np.testing.assert_allclose(low, transforms.blur_degrade(crop, 4), atol=1e-6)
    pairs = unclip_train.bsr_pairs_np(np.random.default_rng(0),
                                      np.zeros((2, 80, 80, 3), np.uint8), 64, 4)  # fmt: skip
    assert pairs["image"].shape == (2, 64, 64, 3) and pairs["low_res"].shape == (2, 16, 16, 3)
    assert pairs["low_res"].dtype == np.float32


def test_train_steps_lower_the_loss():
    # One UNet level keeps compilation fast on CPU; the parity test covers the full structure.
    config = config_utils.load_config("upsample256:tiny", ["model.unet.channel_mult=(1,)"])
    model = upsampler_from_config(config.model)
    loss_fn = unclip_train.loss_fn_from_config(config, model)
    params = nn.meta.unbox(jax.jit(lambda r: init_params(model, r))(jax.random.key(0)))
    tx = optax.adam(3e-3)
    step = jax.jit(make_train_step(loss_fn, tx, lambda s: 3e-3, ema_decay=0.9))
    # Smooth images: the blurred low-res input tells the model most of what it must predict.
    yy, xx = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    phase = np.random.default_rng(0).uniform(0, 6, (8, 1, 1, 3))
    images = jnp.asarray(np.sin(3 * yy[None, ..., None] + 2 * xx[None, ..., None] + phase),
                         jnp.float32)  # fmt: skip
    batch = {"image": images}

    def paired_loss(state):  # the loss at step 0's rng (see tests/test_decoder.py)
        _, metrics = step(state.replace(step=jnp.zeros((), jnp.int32)), batch, jax.random.key(1))
        return float(metrics["loss"])

    state = TrainState.create(params, tx)
    before = paired_loss(state)
    for _ in range(8):
        state, metrics = step(state, batch, jax.random.key(1))
    after = paired_loss(state)
    assert "vb" not in metrics  # fixed variance: plain MSE
    assert int(state.step) == 8 and after < 0.7 * before, (before, after)
