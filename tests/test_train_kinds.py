"""Model kinds through the shared loop: a 30-step CPU run of tiny GLIDE on `shapes` lowers its
loss and writes checkpoints and metrics."""

import json

import pytest
from PIL import Image

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


def test_unwired_choices_are_named(tmp_path):
    config = config_utils.load_config("glide_base64", [f"data.dir={tmp_path}"])
    with pytest.raises(ValueError, match="only 'bytes' is wired up"):
        train(config, tmp_path / "run")
