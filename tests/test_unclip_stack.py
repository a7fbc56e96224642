"""The tiny unCLIP stack composed from run folders: `sample` with every prior type, `vary` and
`interpolate` through the command line, and the unCLIP user errors. The runs hold random weights
(tests/run_fixtures.py); training every kind through the loop and `data embed` is
tests/test_demo.py's miniature demo."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from run_fixtures import make_random_runs

from unclip_jax import cli
from unclip_jax.pipelines.unclip import pipeline_from_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip")
    out = make_random_runs(root, names=("clip", "prior", "ar_prior", "decoder", "upsampler"))
    out["root"] = root
    return out


def test_pipeline_samples_with_every_prior(runs):
    import jax

    pipe = pipeline_from_runs(
        clip=runs["clip"], decoder=runs["decoder"], prior=runs["prior"],
        ar_prior=runs["ar_prior"], upsamplers=[runs["upsampler"]],
    )  # fmt: skip
    prompts = ["a red circle", "a blue square to the left of a green triangle"]
    for prior in ("diffusion", "ar", "none"):
        out = pipe(prompts, jax.random.key(0), prior=prior, decoder_respacing="4")
        assert out["image_emb"].shape == (2, 32)
        assert out["decoded"].shape == (2, 32, 32, 3)
        assert out["images"].shape == (2, 64, 64, 3)
        assert bool(jnp.all(jnp.isfinite(out["images"])))
    with pytest.raises(ValueError, match="unknown prior"):
        pipe(prompts, jax.random.key(0), prior="clip")


def test_sample_vary_interpolate_commands(runs, tmp_path):
    root = runs["root"]
    out = tmp_path / "sample"
    argv = ["sample", "--pipeline", "unclip", "--clip", runs["clip"], "--decoder",
            runs["decoder"], "--prior-run", runs["prior"], "--prior", "diffusion",
            "--steps", "3", "--guidance", "1", "4", "--out", str(out), "a red circle",
            "a yellow triangle"]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["pipeline"] == "unclip" and record["decoder_guidance"] == [1.0, 4.0]
    assert len(record["images"]) == 2 and (out / "grid.png").exists()

    image = root / "input.png"
    Image.fromarray(np.full((40, 40, 3), (220, 50, 50), np.uint8)).save(image)
    base = ["--clip", runs["clip"], "--decoder", runs["decoder"], "--steps", "3"]
    # Variations in bfloat16 compute: the runs' networks rebuilt with dtype bf16, recorded.
    argv = ["vary", str(image), *base, "--n", "2", "--dtype", "bfloat16", "--out",
            str(tmp_path / "v")]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((tmp_path / "v" / "record.json").read_text())
    assert len(record["images"]) == 2 and record["dtype"] == "bfloat16"
    argv = ["interpolate", str(image), str(image), *base, "--n", "3", "--out",
            str(tmp_path / "i")]  # fmt: skip
    assert cli.main(argv) == 0
    with Image.open(tmp_path / "i" / "images" / "interpolation_000.png") as frame:
        assert frame.size == (32, 32)


def test_unclip_user_errors(runs, tmp_path, capsys):
    argv = ["sample", "--pipeline", "unclip", "--clip", runs["clip"], "--decoder",
            runs["decoder"], "--prior", "ar", "x"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--prior ar needs --ar-prior-run" in capsys.readouterr().err
    argv = ["vary", str(tmp_path / "missing.png"), "--clip", runs["clip"], "--decoder",
            runs["decoder"]]  # fmt: skip
    assert cli.main(argv) == 2
    assert "image not found" in capsys.readouterr().err
    argv = ["sample", "--pipeline", "unclip", "--clip", runs["decoder"], "--decoder",
            runs["decoder"], "--prior", "none", "x"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "'decoder' run, not a 'clip' one" in capsys.readouterr().err
