"""CLIP embeddings as data (issue 6): the side dataset equals a direct CLIP forward, two
"processes" write what one writes, reruns are no-ops, the reader resumes, the statistics are
NumPy's, and `run_embed` loads a checkpoint and reports the user's mistakes."""

import argparse
import json

import flax.linen as nn
import grain
import jax
import numpy as np
import pytest

from unclip_jax.checkpoint import Checkpointer
from unclip_jax.config_utils import load_config
from unclip_jax.data import embed_cli, shapes, shapes_builder, transforms
from unclip_jax.data import embeddings as emb
from unclip_jax.models.clip import clip_from_config, init_params, preprocess_images
from unclip_jax.tokenizers import train_bpe

N = 20  # train examples; 3 shards of 8 -> [0, 6), [6, 13), [13, 20)
KW = {"batch_size": 4, "examples_per_shard": 8}
# grain reads 500 records ahead with 16 threads by default: 25 epochs of these 20 records.
READ = {"read_options": grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    builder = shapes_builder.build_shapes(
        str(root / "tfds"), train=N, validation=4, test_compositional=4
    )
    captions = [shapes.render_example("train", i).caption for i in range(200)]
    tokenizer = train_bpe(captions, vocab_size=1024, context_length=16)
    config = load_config("clip_vit_b32:tiny")
    model = clip_from_config(config.model)
    init = jax.jit(lambda key: nn.meta.unbox(init_params(model, key)))
    params = init(jax.random.key(0, impl="unsafe_rbg"))
    out = root / "one"
    report = emb.embed_dataset(builder, "train", model, params, tokenizer, out,
                               process_index=0, process_count=1, **KW)  # fmt: skip
    return {"root": root, "builder": builder, "tokenizer": tokenizer, "config": config,
            "model": model, "params": params, "out": out, "report": report}  # fmt: skip


def _records(out, split="train"):
    source = emb.embedding_source(out, split)
    return [source[i] for i in range(len(source))]


def test_records_equal_a_direct_clip_forward(setup):
    report, model = setup["report"], setup["model"]
    assert report.complete and report.num_shards == 3 and report.examples_written == N
    records = _records(setup["out"])
    assert [int(r["index"]) for r in records] == list(range(N))
    # `index` is the position in the source data source (tfds shuffled the shapes on writing).
    examples = [setup["builder"].as_data_source("train")[i] for i in range(N)]
    assert [r["caption"] for r in records] == [e["caption"] for e in examples]
    r = records[0]
    assert r["image_emb"].shape == r["text_emb"].shape == (32,) and r["image_emb"].dtype == "f4"
    assert r["text_tokens"].shape == (16, 64) and r["text_tokens"].dtype == np.float32
    assert r["tokens"].dtype == np.int32 and r["mask"].dtype == bool

    # The reference: OpenAI-style host resize of the rendered pixels, then the model itself.
    tokens = setup["tokenizer"]([e["caption"].decode() for e in examples])
    images = np.stack([transforms.to_float(transforms.resize_center_crop(e["image"], 16))
                       for e in examples])  # fmt: skip
    forward = jax.jit(lambda p, ids, x, eot: model.apply({"params": p}, ids, x, eot_positions=eot))
    out = forward(setup["params"], tokens.input_ids, preprocess_images(images, 16),
                  tokens.eot_positions)  # fmt: skip
    stack = {k: np.stack([r[k] for r in records]) for k in r if k not in ("caption", "index")}
    np.testing.assert_allclose(stack["image_emb"], out.image_embeds, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(stack["text_emb"], out.text_embeds, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(stack["text_tokens"], out.text_hidden_states, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(stack["tokens"], tokens.input_ids)
    np.testing.assert_array_equal(stack["mask"], tokens.attention_mask)


def test_two_processes_write_what_one_writes_and_reruns_do_nothing(setup):
    out = setup["root"] / "two"
    args = (setup["builder"], "train", setup["model"], setup["params"], setup["tokenizer"], out)
    first = emb.embed_dataset(*args, process_index=0, process_count=2, **KW)
    assert first.shards_written == [0] and not first.complete
    with pytest.raises(FileNotFoundError, match="no finished CLIP embeddings"):
        emb.embedding_source(out, "train")
    second = emb.embed_dataset(*args, process_index=1, process_count=2, **KW)
    assert second.shards_written == [1, 2] and second.complete
    for shard in range(3):
        name = f"clip_embeddings-train.array_record-{shard:05d}-of-00003"
        assert (out / name).read_bytes() == (setup["out"] / name).read_bytes()
    # Done: a second call (here with one process) touches nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = emb.embed_dataset(*args, process_index=0, process_count=1, **KW)
    assert again.already_complete and "nothing to do" in again.summary()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # Another embedding into the same folder is refused, before any compute.
    with pytest.raises(ValueError, match="made differently.*spec"):
        emb.embed_dataset(*args, process_index=0, process_count=1, token_dtype="float16", **KW)
    # An interrupted run resumes: a lost shard is rewritten, the others are kept.
    (out / "_done-train-00001-of-00003.json").unlink()
    (out / "dataset_info.json").unlink()
    resumed = emb.embed_dataset(*args, process_index=0, process_count=1, **KW)
    assert resumed.shards_written == [1] and resumed.shards_skipped == [0, 2] and resumed.complete


def test_reader_batches_join_images_and_resume(setup):
    source = emb.embedding_source(setup["out"], "train")
    kw = {"global_batch": 8, "seed": 1, "process_index": 1, "process_count": 2, **READ}
    batches = emb.make_embedding_loader(source, **kw)
    batch = next(batches)
    assert batch["image_emb"].shape == (4, 32) and batch["text_tokens"].shape == (4, 16, 64)
    assert batch["text_mask"].dtype == bool and batch["tokens"].shape == (4, 16)
    assert "image" not in batch and set(batch["index"]) <= set(range(10, 20))  # second half
    state = json.loads(json.dumps(batches.get_state()))
    want = [next(batches) for _ in range(4)]  # crosses the epoch (2 steps per epoch)
    resumed = emb.make_embedding_loader(source, **kw)
    resumed.set_state(state)
    for a, b in zip(want, [next(resumed) for _ in range(4)], strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["text_emb"], b["text_emb"])

    images = setup["builder"].as_data_source("train")
    joined = emb.make_embedding_loader(
        emb.JoinedSource(source, images), global_batch=4, seed=0, image_size=32,
        process_index=0, process_count=1, **READ,
    )  # fmt: skip
    batch = next(joined)
    assert batch["image"].shape == (4, 32, 32, 3)
    image = images[int(batch["index"][0])]["image"]
    want = transforms.to_float(transforms.resize_center_crop(image, 32))
    np.testing.assert_array_equal(batch["image"][0], want)
    # A resumed run builds new source objects (grain checks repr(source) against the state's).
    state = json.loads(json.dumps(joined.get_state()))
    want = next(joined)
    fresh = emb.JoinedSource(emb.embedding_source(setup["out"], "train"),
                             setup["builder"].as_data_source("train"))  # fmt: skip
    resumed = emb.make_embedding_loader(fresh, global_batch=4, seed=0, image_size=32,
                                        process_index=0, process_count=1, **READ)  # fmt: skip
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], want["image"])
    with pytest.raises(ValueError, match="does not match the image source"):
        emb.JoinedSource(source, setup["builder"].as_data_source("validation"))[1]


def test_statistics_match_numpy(setup):
    stats = emb.load_stats(setup["out"], "train")
    records = _records(setup["out"])
    zi = np.stack([r["image_emb"] for r in records]).astype(np.float64)
    zt = np.stack([r["text_emb"] for r in records]).astype(np.float64)
    np.testing.assert_allclose(stats["image_emb_mean"], zi.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["image_emb_std"], zi.std(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["image_emb_cov"], np.cov(zi.T, ddof=0), atol=1e-6)
    np.testing.assert_allclose(stats["text_emb_std"], zt.std(0), rtol=1e-4, atol=1e-6)
    dots = np.sum(zi * zt, -1) / np.linalg.norm(zi, axis=-1) / np.linalg.norm(zt, axis=-1)
    np.testing.assert_allclose(stats["dot_mean"], dots.mean(), atol=1e-6)
    np.testing.assert_allclose(stats["dot_std"], dots.std(), atol=1e-6)
    assert stats["dot_hist"].sum() == N and int(stats["num_examples"]) == N
    # Percentiles from a 1e-4-wide histogram; NumPy's 'inverted_cdf' is the same definition.
    np.testing.assert_allclose(stats["dot_percentiles"][[0, 100]], [dots.min(), dots.max()],
                               atol=1e-6)  # fmt: skip
    for q in (10, 50, 85):
        want = np.quantile(dots, q / 100, method="inverted_cdf")
        assert 0 <= stats["dot_percentiles"][q] - want <= 1e-4 + 1e-6, q
    summary = json.loads((setup["out"] / "stats-train.json").read_text())
    assert len(summary["image_emb_mean"]) == 32 and len(summary["dot_percentiles"]) == 101


def _args(**kw):
    parser = argparse.ArgumentParser()
    embed_cli.add_embed_arguments(parser)
    argv = [f"--{k}={v}" for k, v in kw.items() if v is not True]
    argv += [f"--{k}" for k, v in kw.items() if v is True]
    return parser.parse_args(argv)


def test_run_embed_from_a_checkpoint_and_user_errors(setup):
    root = setup["root"]
    ckpt_dir = root / "clip_run"
    ckpt = Checkpointer(ckpt_dir, enable_async=False)
    state = {"step": np.int32(5), "params": setup["params"], "ema_params": setup["params"]}
    ckpt.save(5, state, config=json.loads(setup["config"].to_json()))
    ckpt.close()
    setup["tokenizer"].save(ckpt_dir / "tokenizer")
    dataset = setup["builder"].data_dir  # a prepared tfds folder
    report = embed_cli.run_embed(_args(dataset=dataset, out=root / "cli", clip_checkpoint=ckpt_dir,
                                 batch_size=4, examples_per_shard=8, no_stats=True))  # fmt: skip
    assert report.complete and report.examples_written == N
    for a, b in zip(_records(root / "cli"), _records(setup["out"]), strict=True):
        np.testing.assert_array_equal(a["text_tokens"], b["text_tokens"])

    base = {"dataset": dataset, "out": root / "bad", "batch_size": 4}
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint folder not found"):
        embed_cli.run_embed(_args(**base, clip_checkpoint=root / "nope"))
    with pytest.raises(ValueError, match="does not match the weights.*timestep_embedding"):
        embed_cli.run_embed(
            _args(**base, clip_checkpoint=ckpt_dir, clip_config="noised_clip_b64:tiny")
        )
    with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
        embed_cli.run_embed(_args(**base, clip_checkpoint=ckpt_dir, tokenizer=root / "none"))
    with pytest.raises(ValueError, match="exactly one"):
        embed_cli.run_embed(_args(**base))
    with pytest.raises(ValueError, match="is empty"):
        emb.embed_dataset([], "train", setup["model"], setup["params"], setup["tokenizer"],
                          root / "empty", batch_size=4)  # fmt: skip
