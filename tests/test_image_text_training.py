"""Training on your own image-caption pairs (data.name=image_text): a folder of images of mixed
sizes with .txt captions is prepared with a validation split, a tiny CLIP trains on it through
`unclip-jax train`, embeds it (`data embed`), and a tiny decoder trains on the pairs joined with
their embeddings: the same commands as on `shapes`, with data.source naming the folder."""

import json
import logging

import ml_collections
import numpy as np
import pytest
from PIL import Image

from unclip_jax import cli
from unclip_jax.train.kinds import data_source

COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60)}
SIZES = [(40, 32), (24, 56), (64, 64), (33, 47)]  # (width, height): resized and centre-cropped
COMMON = ["optim.steps=3", "train.log_every=1", "train.sample_every=3", "ckpt.save_every=3",
          "train.tensorboard=False", "data.name=image_text"]  # fmt: skip


def make_pairs(folder, count: int = 48) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        colour = list(COLOURS)[i % 3]
        w, h = SIZES[i % len(SIZES)]
        image = np.full((h, w, 3), 128, np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        image[y : y + h // 2, x : x + w // 2] = COLOURS[colour]
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a {colour} square")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_text")
    folder = root / "my_pairs"
    folder.mkdir()
    make_pairs(folder)
    argv = ["data", "prepare", "--dataset", f"image_text:{folder}", "--data_dir",
            str(root / "data"), "--validation-fraction", "0.25"]  # fmt: skip
    assert cli.main(argv) == 0
    return root, folder


def train(root, folder, name, config, *extra):
    argv = ["train", "--config", config, "--workdir", str(root / name)]
    for setting in [*COMMON, f"data.source={folder}", f"data.dir={root / 'data'}", *extra]:
        argv += ["--set", setting]
    assert cli.main(argv) == 0
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps and max(steps) == 3 and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert (root / name / "checkpoints").is_dir()
    return root / name


def test_clip_then_decoder_train_on_a_folder_of_pairs(pairs):
    root, folder = pairs
    clip_run = train(root, folder, "clip", "clip_vit_b32:tiny", "optim.batch_size=8")
    out = root / "embeddings"
    for split in ("train", "validation"):
        argv = ["data", "embed", "--dataset", f"image_text:{folder}", "--data_dir",
                str(root / "data"), "--split", split, "--out", str(out), "--clip_checkpoint",
                str(clip_run), "--batch_size", "16"]  # fmt: skip
        assert cli.main(argv) == 0
    train(root, folder, "decoder", "decoder64:tiny", f"data.embeddings={out}",
          "optim.batch_size=8", "model.unet.channel_mult=(1,)", "model.unet.image_size=16",
          "model.unet.attention_resolutions=''", "train.sample_respacing='4'")  # fmt: skip


def test_data_source_errors_and_the_missing_validation_split(tmp_path, caplog):
    folder = tmp_path / "pairs"
    folder.mkdir()
    make_pairs(folder, count=6)
    data = ml_collections.ConfigDict({"name": "image_text", "source": "", "dir": str(tmp_path),
                                      "config": "", "split": "train"})  # fmt: skip
    config = ml_collections.ConfigDict({"data": data})
    with pytest.raises(ValueError, match="needs data.source"):
        data_source(config)
    config.data.source = str(folder)
    assert len(data_source(config)) == 6
    with caplog.at_level(logging.WARNING):
        held_out = data_source(config, "validation")  # built without one: train, with a warning
    assert len(held_out) == 6 and "no validation split" in caplog.text
    config.data.name = "laion"
    with pytest.raises(ValueError, match="'shapes' or 'image_text'"):
        data_source(config)
