"""transformers -> our CLIP import: config mapping, round trip, and clear errors on bad files."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unclip_jax.convert.clip import config_from_hf, hf_state_dict, load_hf_clip
from unclip_jax.convert.common import ConversionError

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "clip"
KEY = "text_model.encoder.layers.1.self_attn.q_proj.weight"


def _copy(tmp_path, name="clip_model"):
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _rewrite(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize("name", ["clip_model", "clip_text_model", "clip_vision_model"])
def test_round_trip_reproduces_the_checkpoint(name):
    _, params = load_hf_clip(FIXTURES / name)
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    exported = hf_state_dict(params)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_config_mapping():
    hf = json.loads((FIXTURES / "clip_model" / "config.json").read_text())
    c = config_from_hf(hf)
    assert (c.text.width, c.text.layers, c.text.heads, c.text.mlp_dim) == (32, 2, 4, 80)
    assert (c.text.context_length, c.text.eos_token_id, c.text.eot_pooling) == (16, 98, "first_eos")
    assert (c.vision.image_size, c.vision.patch_size, c.vision.width) == (32, 8, 48)
    assert c.projection_dim == 24 and c.vision.num_timesteps is None
    # Keys left out of config.json take transformers' defaults (ViT-B/32's).
    minimal = config_from_hf({"model_type": "clip"})
    assert minimal.text.vocab_size == 49408 and minimal.vision.patch_size == 32
    assert minimal.projection_dim == 512 and minimal.text.eot_pooling == "first_eos"
    old = config_from_hf({"model_type": "clip", "text_config_dict": {"eos_token_id": 2}})
    assert old.text.eot_pooling == "argmax"


def test_renamed_key_names_both_sides(tmp_path):
    folder = _copy(tmp_path)
    _rewrite(folder, lambda s: s.__setitem__("text_model.renamed.weight", s.pop(KEY)))
    with pytest.raises(ConversionError) as err:
        load_hf_clip(folder)
    message = str(err.value)
    assert f"missing from checkpoint: {KEY}" in message
    assert "unexpected key in checkpoint: text_model.renamed.weight" in message


def test_wrong_shape_is_named(tmp_path):
    folder = _copy(tmp_path)
    _rewrite(folder, lambda s: s.__setitem__(KEY, s[KEY][:, :30].copy()))
    with pytest.raises(
        ConversionError,
        match=r"q_proj\.weight: .*shape \(32, 30\) in the checkpoint, expected \(32, 32\)",
    ):
        load_hf_clip(folder)


def test_truncated_file_is_a_clear_error(tmp_path):
    folder = _copy(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated or not a safetensors file"):
        load_hf_clip(folder)


def test_stale_buffers_are_ignored(tmp_path):
    folder = _copy(tmp_path, "clip_text_model")
    _rewrite(folder, lambda s: s.__setitem__(
        "text_model.embeddings.position_ids", np.arange(20, dtype=np.int64)[None]))  # fmt: skip
    load_hf_clip(folder)


def test_refuses_pickles_and_unknown_models(tmp_path):
    folder = _copy(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pickled weights are never loaded"):
        load_hf_clip(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ConversionError, match="model_type 'siglip'"):
        load_hf_clip(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_clip(folder)
