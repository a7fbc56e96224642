"""Model kinds through the shared loop: a 30-step CPU run of tiny GLIDE on `shapes` lowers its
loss and writes checkpoints and metrics, samples from the command line, with classifier-free
guidance and with CLIP guidance from a noise-aware CLIP trained through `train` (GLIDE's inpaint
and upsampler configs: tests/test_glide_kinds.py)."""

import json

import numpy as np
import pytest
from PIL import Image
from test_image_text_training import make_pairs

from unclip_jax import cli, config_utils
from unclip_jax.checkpoint import Checkpointer
from unclip_jax.train.loop import train


def test_tiny_glide_trains_on_shapes(tmp_path):
    config = config_utils.load_config("glide_base64:tiny", [f"data.dir={tmp_path / 'data'}"])
    summary = train(config, tmp_path / "run")
    assert summary["step"] == 30
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 15, 20, 25, 30]
    first, last = lines[0]["mse"], sum(m["mse"] for m in lines[-2:]) / 2
    assert last < 0.7 * first, (first, last)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", enable_async=False)
    assert ckpt.latest_step() == 30
    _, saved_config, data_state = ckpt.restore()
    ckpt.close()
    assert saved_config["kind"] == "glide" and "grain" in data_state
    # Held-out loss on the validation split at steps 15 and 30; an EMA sample grid at the end.
    lines = (tmp_path / "run" / "eval_metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x) for x in lines]
    assert [m["step"] for m in evals] == [15, 30]
    with Image.open(tmp_path / "run" / "samples" / "step_000030.png") as grid:
        assert grid.size == (2 + 2 * 18, 2 + 2 * 18)  # 3 prompts, 16 px tiles, 2 columns

    # The trained run samples from the command line: grid, one PNG per image, a JSON record.
    out = tmp_path / "samples"
    argv = ["sample", "--base", str(tmp_path / "run"), "a red circle", "a blue square",
            "--steps", "4", "--guidance", "1", "3", "--seed", "7", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["prompts"] == ["a red circle", "a blue square"] and record["seed"] == 7
    assert record["guidance"] == [1.0, 3.0] and len(record["images"]) == 2
    with Image.open(out / "grid.png") as grid, Image.open(record["images"][0]) as first:
        assert first.size == (16, 16) and grid.size[0] > 2 * 16

    # GLIDE's CLIP guidance from the command line (issue 18): a noise-aware CLIP trained through
    # `train` (on coloured squares with their captions: 20 steps learn colour) guides this run's
    # base stage; on the same seed its own score of the samples rises against scale 0, which is
    # the unguided sampler (tests/test_clip_training.py checks that equality).
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    make_pairs(pairs, count=96)
    noised = tmp_path / "noised_clip"
    settings = ["data.name=image_text", f"data.source={pairs}", f"data.dir={tmp_path / 'data'}",
                "optim.steps=20", "optim.batch_size=32", "train.log_every=5",
                "train.sample_every=0", "train.tensorboard=False"]  # fmt: skip
    argv = ["train", "--config", "noised_clip_b64:tiny", "--workdir", str(noised)]
    assert cli.main([*argv, *(a for s in settings for a in ("--set", s))]) == 0
    prompts = ["a red square", "a blue square", "a green square", "a red square"]
    scores = []
    for scale in ("0", "10"):
        out = tmp_path / f"clip_guided_{scale}"
        argv = ["sample", "--base", str(tmp_path / "run"), *prompts, "--steps", "8", "--seed", "7",
                "--clip-guidance", str(noised), "--clip-guidance-scale", scale,
                "--out", str(out)]  # fmt: skip
        assert cli.main(argv) == 0
        record = json.loads((out / "record.json").read_text())
        assert record["clip_guidance"] == str(noised) and record["guidance"] is None
        scores.append(noised_clip_scores(noised, prompts, record["images"]))
    unguided, guided = scores
    print(f"noised CLIP's score of its prompts: unguided {unguided}, guided {guided}")
    assert (guided > unguided + 0.01).all() and (guided - unguided).mean() > 0.03


def noised_clip_scores(run, prompts, image_files) -> np.ndarray:
    """Cosine similarity [N] of each prompt and its image under a noise-aware CLIP run, at t = 0."""
    import jax.numpy as jnp

    from unclip_jax.imaging import load_image
    from unclip_jax.models.clip import l2_normalize
    from unclip_jax.pipelines.unclip import clip_from_run

    clip = clip_from_run(run)
    tokens = clip.tokenizer(prompts)
    images = jnp.asarray(np.stack([load_image(f) for f in image_files]))
    out = clip.model.apply({"params": clip.params}, jnp.asarray(tokens.input_ids), images,
                           timesteps=jnp.zeros(len(prompts), jnp.int32),
                           eot_positions=jnp.asarray(tokens.eot_positions))  # fmt: skip
    return np.asarray(jnp.sum(l2_normalize(out.text_embeds) * l2_normalize(out.image_embeds), -1))


BPE = ("data.tokenizer='gpt2_bpe'", "model.text.vocab_size=512", "model.text.pad_id=511",
       "model.text.text_ctx=16")  # fmt: skip


def _fewer_merges(tok, n: int):
    """(vocab, merges) of `tok` keeping its bytes and first n merges, <|endoftext|> last."""
    tokens = list(tok.vocab)[: 256 + n] + ["<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, tok.merges[:n]


def test_glide_learns_a_bpe_on_its_captions_and_keeps_it_in_the_run(tmp_path):
    """data.tokenizer 'gpt2_bpe' with no tokenizer/ in the run: a GPT-2-style BPE learned on the
    captions (a word is one token, ids below the model's vocabulary), saved in the run and read
    back on resume; a fine-tune takes ckpt.init_from's; bad vocabularies are named."""
    from unclip_jax.tokenizers import (
        Gpt2BpeTokenizer,
        glide_tokenize,
        glide_tokenizer_from_config,
        train_gpt2_bpe,
    )
    from unclip_jax.train.kinds import glide_kind, glide_tokenizer_for_run

    config = config_utils.load_config("glide_base64:tiny", [f"data.dir={tmp_path / 'data'}", *BPE])
    run = tmp_path / "run"
    tok = glide_tokenizer_for_run(config, run)
    assert (run / "tokenizer").is_dir() and not (run / "tokenizer.partial").exists()
    assert 256 + 2 <= tok.vocab_size <= 512
    words = ["a", " red", " circle", " to", " the", " left", " of", " blue", " square"]
    ids = tok.encode("a red circle to the left of a blue square")
    assert len(ids) == 10 and max(ids) < tok.vocab_size - 1, ids  # one token per word
    assert [tok.encode(w) for w in words] == [[i] for i in (ids[:7] + ids[8:])]
    # Resume and sampling read the saved files: the same ids, padded with the model's pad id.
    again = glide_tokenizer_from_config(config.data, run)
    assert again.vocab == tok.vocab and again.merges == tok.merges
    tokens, mask = glide_tokenize(again, ["a red circle"], 16, 511)
    assert tokens[0].tolist() == tok.encode("a red circle") + [511] * 13 and mask.sum() == 3
    batch = next(iter(glide_kind(config, run).data(4, 0, 1)))
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].max() <= 511
    # A fine-tune from a run with a tokenizer takes it (not a new one learned on its own data).
    base = Gpt2BpeTokenizer(*_fewer_merges(tok, 20))
    base.save(tmp_path / "base" / "tokenizer")
    tuned = config_utils.load_config("glide_base64:tiny", [
        f"data.dir={tmp_path / 'data'}", *BPE, f"ckpt.init_from={tmp_path / 'base'}"])  # fmt: skip
    assert glide_tokenizer_for_run(tuned, tmp_path / "tuned").vocab == base.vocab != tok.vocab
    assert (tmp_path / "tuned" / "tokenizer" / "vocab.json").is_file()

    with pytest.raises(ValueError, match="pass workdir"):
        glide_tokenizer_for_run(config)
    small = config_utils.load_config("glide_base64:tiny", [
        f"data.dir={tmp_path / 'data'}", *BPE, "model.text.vocab_size=300",
        "model.text.pad_id=299"])  # fmt: skip
    with pytest.raises(ValueError, match=f"has {tok.vocab_size} ids; .* vocab_size is 300"):
        glide_tokenizer_for_run(small, run)  # the run's tokenizer no longer fits
    clash = config_utils.load_config("glide_base64:tiny", [
        f"data.dir={tmp_path / 'data'}", *BPE, "model.text.pad_id=100"])  # fmt: skip
    with pytest.raises(ValueError, match="pad_id 100"):
        glide_tokenizer_for_run(clash, run)
    with pytest.raises(ValueError, match="vocab_size must be at least 258"):
        train_gpt2_bpe(["a red circle"], 257)
    with pytest.raises(ValueError, match="unknown GLIDE tokenizer 'words'"):
        glide_tokenizer_for_run(config_utils.load_config(
            "glide_base64:tiny", ["data.tokenizer='words'"]), run)  # fmt: skip
