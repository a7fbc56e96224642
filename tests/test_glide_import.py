"""glide-text2im checkpoints: the torch-free .pt reader; our GlideUNet reproducing the reference.

tests/fixtures/glide_tiny/ comes from tests/fixtures/make_glide_fixtures.py: tiny glide-text2im
models of all four classes (float16 state dicts written by torch.save), their float32 outputs on
fixed inputs, and the shapes of the four released checkpoints; tests/fixtures/torch_pickle, what
torch.load reads from files torch.save wrote. No test needs torch.
"""

import json
import pathlib
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import config_utils
from unclip_jax.convert.common import ConversionError, flatten
from unclip_jax.convert.glide import convert_glide, glide_config_from_state, load_glide
from unclip_jax.convert.torch_pickle import load_torch_state_dict
from unclip_jax.models.glide import glide_from_config

FOLDER = pathlib.Path(__file__).parent / "fixtures" / "glide_tiny"
# The tiny models' hyperparameters that no shape reveals (make_glide_fixtures.py).
TINY = dict(num_head_channels=16, xf_heads=2)
# mode -> (image size, what the importer must infer from the shapes).
EXPECTED = {
    "base": (16, dict(channel_mult=(1, 2), num_res_blocks=1, attention_resolutions="8",
                      use_scale_shift_norm=True, resblock_updown=True)),
    "inpaint": (16, dict(channel_mult=(1, 1), num_res_blocks=2, attention_resolutions="16",
                         use_scale_shift_norm=False, resblock_updown=False)),
    "upsample": (32, dict(channel_mult=(1, 1), num_res_blocks=1, attention_resolutions="16",
                          use_scale_shift_norm=True, resblock_updown=True)),
    "upsample_inpaint": (32, dict(channel_mult=(1, 1), num_res_blocks=1,
                                  attention_resolutions="16", use_scale_shift_norm=True,
                                  resblock_updown=True)),
}  # fmt: skip


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_imported_model_reproduces_glide_text2im(mode):
    size, expected = EXPECTED[mode]
    config, params = load_glide(FOLDER / f"{mode}.pt", image_size=size, **TINY)
    assert config.mode == mode
    assert {k: config.unet[k] for k in expected} == expected
    assert config.text.final_ln == config.text.padding_embedding == (mode != "upsample")
    assert (config.text.vocab_size, config.text.text_ctx, config.text.layers) == (64, 16, 2)
    data = np.load(FOLDER / f"{mode}.npz")
    extras = {k: nhwc(data[k]) for k in ("low_res", "inpaint_image", "inpaint_mask") if k in data}
    model = glide_from_config(config)
    inputs = [nhwc(data["x"])] + [jnp.asarray(data[k]) for k in ("timesteps", "tokens", "mask")]
    out = jax.jit(model.apply)({"params": params}, *inputs, **extras)
    err = float(np.max(np.abs(np.asarray(out) - np.asarray(nhwc(data["out"])))))
    print(f"{mode}: max abs error {err:.2e} (outputs up to {np.abs(data['out']).max():.1f})")
    assert err < 2e-5


@pytest.mark.parametrize(
    "name,preset",
    [("base", "glide_base64"), ("base-inpaint", "glide_inpaint64"),
     ("upsample", "glide_upsample256"), ("upsample-inpaint", "glide_upsample256:inpaint")],
)  # fmt: skip
def test_released_checkpoint_shapes_give_our_presets(name, preset):
    shapes = json.loads((FOLDER / "released_shapes.json").read_text())[name]
    state = {k: np.broadcast_to(np.float32(0), v) for k, v in shapes.items()}  # shapes only
    config = glide_config_from_state(state, mode=name)
    ref = config_utils.load_config(preset).model
    assert config.mode == ref.mode and config.get("low_res_size") == ref.get("low_res_size")
    assert config.text.to_dict() == ref.text.to_dict()
    assert config.unet.to_dict() == ref.unet.to_dict()
    convert_glide(glide_from_config(config), state)  # every key used, every shape right


def test_strict_keys_are_named():
    state = load_torch_state_dict(FOLDER / "base.pt")
    model = glide_from_config(glide_config_from_state(state, **TINY))
    del state["input_blocks.1.0.in_layers.2.bias"]
    state["unemb.weight"] = np.zeros((64, 32), np.float16)
    state["middle_block.1.qkv.weight"] = np.zeros((192, 64), np.float16)  # not a Conv1d
    state["transformer_proj.weight"] = np.zeros((128, 16), np.float16)
    with pytest.raises(ConversionError) as err:
        convert_glide(model, state)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "missing from checkpoint: input_blocks.1.0.in_layers.2.bias" in msg
    assert "unexpected key in checkpoint: unemb.weight" in msg
    assert "middle_block.1.qkv.weight: cannot convert for unet/middle_block_1/qkv/kernel" in msg
    assert "shape mismatch: transformer_proj.weight (128, 16)" in msg


def test_wrong_mode_and_non_glide_state_are_refused():
    with pytest.raises(ConversionError, match="mode 'upsample' needs 6 input channels"):
        load_glide(FOLDER / "base.pt", mode="upsample", **TINY)
    with pytest.raises(ConversionError, match="no 'time_embed.0.weight'"):
        glide_config_from_state({"token_embedding.weight": np.zeros((4, 8))})


def _archive(path, pickled: bytes, extra: dict | None = None):
    """A zip laid out as torch.save writes it, around the given data.pkl."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        for name, data in (extra or {}).items():
            z.writestr(f"archive/{name}", data)
    return path


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_reader_refuses_code_and_names_bad_files(tmp_path):
    marker = tmp_path / "pwned"
    evil = _archive(tmp_path / "evil.pt", pickle.dumps({"w": _Evil(marker)}, protocol=2))
    with pytest.raises(ConversionError, match=r"refusing to unpickle (os|posix|nt)\.system"):
        load_torch_state_dict(evil)
    assert not marker.exists()

    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(ConversionError, match="legacy .pre-1.6. serialization.*safetensors"):
        load_torch_state_dict(legacy)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not a zip archive"):
        load_torch_state_dict(tmp_path / "junk.pt")

    scalar = _archive(tmp_path / "scalar.pt", pickle.dumps({"step": 3}, protocol=2))
    with pytest.raises(ConversionError, match="'step' is a int, expected a tensor"):
        load_torch_state_dict(scalar)

    # The fixture without one of its storages.
    truncated = tmp_path / "truncated.pt"
    with zipfile.ZipFile(FOLDER / "base.pt") as src, zipfile.ZipFile(truncated, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("/data/3"):
                dst.writestr(item, src.read(item))
    with pytest.raises(ConversionError, match=r"storage \w+/data/3 is missing"):
        load_torch_state_dict(truncated)


def test_reader_matches_torch_load():
    """Files written by torch.save (tests/fixtures/make_torch_pickle_fixtures.py) read as torch.load
    reads them: key order, dtype, shape and bytes (SHA-256) of every tensor, including views that
    share a storage (transposed, offset and strided), bfloat16 (as float32), bool, int64 and 0-d
    tensors; nested state dicts unwrap; ambiguous nesting, pickled modules and torch's legacy
    format are refused with the reason."""
    import hashlib
    import json

    fixtures = FOLDER.parent
    pickles = fixtures / "torch_pickle"
    expected = json.loads((pickles / "expected.json").read_text())
    assert {"torch_pickle/mixed.pt", "torch_pickle/nested.pt", "glide_tiny/base.pt"} <= set(
        expected
    )
    for name, tensors in expected.items():
        ours = load_torch_state_dict(fixtures / name)
        assert list(ours) == list(tensors), name
        for key, (dtype, shape, sha) in tensors.items():
            array = np.ascontiguousarray(ours[key])
            assert (array.dtype.name, list(array.shape)) == (dtype, shape), (name, key)
            assert hashlib.sha256(array.tobytes()).hexdigest() == sha, (name, key)
    with pytest.raises(ConversionError, match="ambiguous"):
        load_torch_state_dict(pickles / "two.pt")
    with pytest.raises(ConversionError, match="torch.nn.modules.linear.Linear.*state_dict"):
        load_torch_state_dict(pickles / "module.pt")
    with pytest.raises(ConversionError, match="legacy"):
        load_torch_state_dict(pickles / "old.pt")


# ------------------------------------------------------------------------------------------------
# GLIDE's BPE and `unclip-jax convert glide`

BPE = pathlib.Path(__file__).parent / "fixtures" / "glide_bpe"


def test_gpt2_bpe_gives_glide_text2im_tokens(tmp_path):
    """Our tokenizer on glide-text2im's own BPE files gives its Encoder's ids (bpe.json, written by
    make_glide_fixtures.py from tokenizer/bpe.py), padded and masked as GLIDE does."""
    from unclip_jax.tokenizers import Gpt2BpeTokenizer, glide_tokenize

    reference = json.loads((BPE / "bpe.json").read_text())
    tok = Gpt2BpeTokenizer.from_folder(BPE)
    assert (tok.vocab_size, tok.pad_id) == (reference["n_vocab"], reference["end_token"])
    prompts = list(reference["ids"])
    tokens, mask = glide_tokenize(tok, prompts, 20, tok.pad_id, warn=False)
    for row, prompt in enumerate(prompts):
        ids = reference["ids"][prompt][:20]
        assert tokens[row].tolist() == ids + [tok.pad_id] * (20 - len(ids)), prompt
        assert mask[row].tolist() == [True] * len(ids) + [False] * (20 - len(ids))
    # Saved as GPT-2's vocab.json + merges.txt, it loads back to the same ids.
    again = Gpt2BpeTokenizer.from_folder(tok.save(tmp_path / "bpe"))
    assert all(again.encode(p.lower()) == reference["ids"][p] for p in prompts)
    with pytest.raises(FileNotFoundError, match="vocab.bpe.gz"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "vocab.json").write_text("{}")
        Gpt2BpeTokenizer.from_folder(tmp_path / "half")


def _tiny_bpe(folder: pathlib.Path) -> pathlib.Path:
    """A 64-token byte-level BPE for the tiny fixtures' vocabulary: lower-case letters, the
    byte-level space "\u0120", a few merges, the end token last."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u0120"]
    merges = [("\u0120", "r"), ("e", "d"), ("\u0120", "c"), ("i", "r"), ("c", "l"), ("l", "e")]
    vocab = letters + ["".join(m) for m in merges]
    vocab += [f"x{i}" for i in range(63 - len(vocab))] + ["<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    return folder


def test_convert_glide_then_sample_through_the_cli(tmp_path, capsys):
    from unclip_jax import cli
    from unclip_jax.checkpoint import load_run
    from unclip_jax.convert import runs

    bpe = _tiny_bpe(tmp_path / "bpe")
    out = runs.convert_glide(FOLDER / "base.pt", tmp_path / "glide", tokenizer=bpe,
                             image_size=16, **TINY)  # fmt: skip
    config, params = load_run(out)
    assert config.kind == "glide" and config.data.tokenizer == "gpt2_bpe"
    assert config.model.unet.image_size == 16 and config.converted_from.startswith("glide-text2im")
    _, direct = load_glide(FOLDER / "base.pt", image_size=16, **TINY)
    ours, theirs = flatten(params), flatten(direct)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(value), err_msg=key)

    argv = ["sample", "--base", str(out), "a red circle", "a cat", "--steps", "2",
            "--out", str(tmp_path / "s")]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((tmp_path / "s" / "record.json").read_text())
    assert len(record["images"]) == 2

    # Errors: no --tokenizer; a tokenizer of another vocabulary size.
    assert cli.main(["convert", "glide", str(FOLDER / "base.pt"), "--out",
                     str(tmp_path / "x")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenizer" in err[0], err
    with pytest.raises(ConversionError, match="embeds 64 tokens but the tokenizer .* has 50257"):
        runs.convert_glide(FOLDER / "base.pt", tmp_path / "y", tokenizer=BPE, image_size=16,
                           **TINY)  # fmt: skip
