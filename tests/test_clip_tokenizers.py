"""The CLIP BPE tokenizer: a trained one and an OpenAI-format folder behind one interface."""

import json
import logging

import numpy as np
import pytest

from unclip_jax.tokenizers import ClipTokenizer, bytes_to_unicode, train_bpe

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
CAPTIONS = [
    f"a {c} {s} on the {side}" for c in COLORS for s in SHAPES for side in ("left", "right")
]


@pytest.fixture(scope="module")
def trained():
    return train_bpe(CAPTIONS * 4, vocab_size=600, context_length=12)


def test_trained_layout_matches_openai(trained):
    vocab = trained.hf.get_vocab()
    base = list(bytes_to_unicode().values())
    assert [vocab[b] for b in base] == list(range(256))  # bytes first, in OpenAI's order
    assert vocab[base[0] + "</w>"] == 256  # then word-final bytes
    assert trained.eot_id == trained.vocab_size - 1 and trained.sot_id == trained.vocab_size - 2
    assert 514 < trained.vocab_size <= 600
    # Frequent words became single tokens.
    assert len(trained("triangle").input_ids[0, 1 : trained("triangle").eot_positions[0]]) == 1


def test_padding_eot_position_and_empty_prompt(trained):
    out = trained(["a red circle", "", "A  RED circle!"])
    assert out.input_ids.shape == (3, 12) and out.input_ids.dtype == np.int32
    assert (out.input_ids[:, 0] == trained.sot_id).all()
    assert out.input_ids[np.arange(3), out.eot_positions].tolist() == [trained.eot_id] * 3
    assert out.eot_positions[1] == 1  # the empty prompt: [sot, eot, pad...], the null condition
    assert (out.attention_mask.sum(1) == out.eot_positions + 1).all()
    assert (out.input_ids[0, out.eot_positions[0] + 1 :] == trained.pad_id).all()
    # CLIP's normalisation: case and runs of spaces do not matter; punctuation is its own token.
    np.testing.assert_array_equal(out.input_ids[2, :4], out.input_ids[0, :4])
    assert trained.decode(out.input_ids[0]) == "a red circle"
    assert not out.truncated.any()


def test_too_long_prompts_are_truncated_with_a_warning(trained, caplog):
    long = " ".join(["blue square"] * 20)
    with caplog.at_level(logging.WARNING, logger="unclip_jax.tokenizers"):
        out = trained([long, "a red circle"])
    assert out.truncated.tolist() == [True, False]
    assert out.eot_positions[0] == 11 and out.input_ids[0, 11] == trained.eot_id
    assert "prompt 0 has" in caplog.text and "truncated" in caplog.text


def test_save_and_load_back(trained, tmp_path):
    trained.save(tmp_path / "tok")
    loaded = ClipTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.context_length == 12 and loaded.vocab_size == trained.vocab_size
    np.testing.assert_array_equal(loaded(CAPTIONS).input_ids, trained(CAPTIONS).input_ids)


def test_openai_style_folder(trained, tmp_path, caplog):
    """vocab.json + merges.txt (OpenAI's release format) load through the same interface."""
    vocab = trained.hf.get_vocab()
    merges = [line.split() for line in _merges(trained)]
    folder = tmp_path / "openai"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    with caplog.at_level(logging.WARNING, logger="unclip_jax.tokenizers"):
        tok = ClipTokenizer.from_pretrained(folder)
    assert tok.context_length == 77 and "no context length" in caplog.text
    tok = ClipTokenizer.from_pretrained(folder, context_length=12, pad_id=0)  # Karlo pads with 0
    out = tok(CAPTIONS[:3])
    np.testing.assert_array_equal(
        np.where(out.attention_mask, out.input_ids, 0), np.where(out.attention_mask,
        trained(CAPTIONS[:3]).input_ids, 0))  # fmt: skip
    assert (out.input_ids[~out.attention_mask] == 0).all()


def _merges(tok):
    data = json.loads(tok.hf.backend_tokenizer.to_str())["model"]["merges"]
    return [" ".join(m) if not isinstance(m, str) else m for m in data]


def test_bad_inputs(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        ClipTokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        ClipTokenizer.from_pretrained(tmp_path / "empty")
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        trained(["ok", 3])
    with pytest.raises(ValueError, match="vocab_size must be at least 515"):
        train_bpe(CAPTIONS, vocab_size=100, context_length=8)
