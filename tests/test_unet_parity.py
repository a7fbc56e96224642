"""Our UNet reproduces diffusers' UNet2DConditionModel with Karlo's block types (fixture-based)."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unclip_jax.convert import common
from unclip_jax.convert.diffusers_unet import load_diffusers_unet

HERE = pathlib.Path(__file__).parent / "fixtures"
FOLDER = HERE / "unet_karlo_tiny"
DATA = np.load(HERE / "unet_karlo_tiny.npz")


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def converted():
    return load_diffusers_unet(FOLDER)


def test_outputs_match_diffusers(converted):
    unet, params = converted
    n_ours = sum(p.size for p in common.flatten(params).values())
    assert n_ours == int(DATA["num_params"])
    kw = dict(emb=jnp.asarray(DATA["class_labels"]), encoder_out=jnp.asarray(DATA["encoder"]))
    x, t = nhwc(DATA["sample"]), jnp.asarray(DATA["timesteps"])
    out = unet.apply({"params": params}, x, t, encoder_mask=jnp.asarray(DATA["mask"]), **kw)
    # Absolute tolerance ~4x the measured errors (5.3e-6 and 5.6e-6 on values up to 2.6).
    np.testing.assert_allclose(out, nhwc(DATA["out"]), atol=2e-5, rtol=0)
    out = unet.apply({"params": params}, x, t, **kw)
    np.testing.assert_allclose(out, nhwc(DATA["out_nomask"]), atol=2e-5, rtol=0)
    # The mask matters for the first example (2 padded tokens) and not for the second.
    diff = np.abs(np.asarray(out) - np.asarray(nhwc(DATA["out"]))).reshape(2, -1).max(-1)
    assert diff[0] > 1e-3 and diff[1] < 1e-5


def _corrupt(tmp_path, edit):
    folder = tmp_path / "unet"
    shutil.copytree(FOLDER, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    edit(state, weights)
    return folder


def test_renamed_key_is_named(tmp_path):
    def rename(state, path):
        state["mid_block.attentions.0.to_q.weightx"] = state.pop(
            "mid_block.attentions.0.to_q.weight"
        )
        save_file(state, str(path))

    with pytest.raises(common.ConversionError) as err:
        load_diffusers_unet(_corrupt(tmp_path, rename))
    msg = str(err.value)
    assert "missing from checkpoint: mid_block.attentions.0.to_q.weight" in msg
    assert "unexpected key in checkpoint: mid_block.attentions.0.to_q.weightx" in msg


def test_wrong_shape_is_named(tmp_path):
    def reshape(state, path):
        state["conv_in.weight"] = np.zeros((32, 4, 3, 3), np.float32)
        save_file(state, str(path))

    with pytest.raises(
        common.ConversionError, match=r"shape mismatch: conv_in.weight \(32, 4, 3, 3\)"
    ):
        load_diffusers_unet(_corrupt(tmp_path, reshape))


def test_truncated_file_is_named(tmp_path):
    def truncate(state, path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    with pytest.raises(common.ConversionError, match="truncated or not a safetensors file"):
        load_diffusers_unet(_corrupt(tmp_path, truncate))


def test_unsupported_blocks_are_named(tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(FOLDER, folder)
    config = json.loads((folder / "config.json").read_text())
    config["down_block_types"][1] = "CrossAttnDownBlock2D"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported diffusers down blocks.*CrossAttnDownBlock2D"):
        load_diffusers_unet(folder)
