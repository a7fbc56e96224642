"""`unclip-jax convert` (public weights -> run folders) and `unclip-jax inpaint`.

convert reads the committed Karlo-layout fixture (tests/fixtures/karlo_tiny, written by
make_karlo_fixtures.py from diffusers/transformers models): every converted run must hold exactly
the params the direct importers give, load through the run-folder pipeline builders, and sample.
inpaint runs a random-weight tiny GLIDE inpainting run: whatever the weights, the kept pixels
come back as given, because they are put back into every predicted x0.
"""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from run_fixtures import save_random_run

from unclip_jax import cli, config_utils
from unclip_jax.checkpoint import Checkpointer, load_run
from unclip_jax.convert.common import flatten

KARLO = pathlib.Path(__file__).parent / "fixtures" / "karlo_tiny"


def _one_error_line(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _assert_same(ours, theirs):
    a, b = flatten(ours), flatten(theirs)
    assert set(a) == set(b)
    for key in b:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.fixture(scope="module")
def karlo_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("karlo")
    assert cli.main(["convert", "karlo", str(KARLO), "--out", str(out)]) == 0
    return out


def test_convert_karlo_writes_the_imported_params(karlo_runs):
    from unclip_jax.convert.diffusers_prior import load_diffusers_prior
    from unclip_jax.convert.diffusers_unclip import load_diffusers_decoder, load_diffusers_upsampler
    from unclip_jax.convert.runs import karlo_clip

    config, params = load_run(karlo_runs / "prior")
    assert config.kind == "prior" and config.model.scaling == "standardize"
    _assert_same(params, load_diffusers_prior(KARLO / "prior")[1])
    config, params = load_run(karlo_runs / "decoder")
    assert config.kind == "decoder" and config.sample.guidance_scale == 8.0  # Karlo's template
    _assert_same(params, load_diffusers_decoder(KARLO)[1])
    config, params = load_run(karlo_runs / "upsampler")
    assert config.model.last_step and set(params) == {"first", "last"}
    for which in ("first", "last"):
        _, direct = load_diffusers_upsampler(KARLO / f"super_res_{which}", low_res_size=16)
        _assert_same(params[which], direct)
    config, params = load_run(karlo_runs / "clip", ema=False)
    assert config.model.text is not None and config.model.vision is not None
    _assert_same(params, karlo_clip(KARLO)[1])
    # Params-only: no optimizer state or EMA on disk.
    ckpt = Checkpointer(karlo_runs / "decoder" / "checkpoints", enable_async=False)
    assert ckpt.state_keys() == ("params",)
    ckpt.close()


def test_converted_karlo_runs_sample_through_the_cli(karlo_runs, tmp_path):
    out = tmp_path / "samples"
    argv = ["sample", "--pipeline", "unclip", "--clip", str(karlo_runs / "clip"),
            "--prior-run", str(karlo_runs / "prior"), "--decoder", str(karlo_runs / "decoder"),
            "--upsamplers", str(karlo_runs / "upsampler"), "--prior-guidance", "1.0",
            "--steps", "2", "--guidance", "2.0", "--out", str(out), "a red circle"]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["runs"]["decoder"] == str(karlo_runs / "decoder")
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] >= 64  # the 64 px super-res output of the 16 px decoder


def test_convert_user_errors(karlo_runs, tmp_path, capsys):
    line = _one_error_line(capsys, ["convert", "karlo", str(KARLO), "--out", str(karlo_runs)])
    assert "already holds a run" in line
    argv = ["convert", "karlo", str(tmp_path), "--out", str(tmp_path / "o")]
    line = _one_error_line(capsys, argv)
    assert "not a diffusers unCLIP folder" in line
    # The text encoder folder has no tokenizer files beside it.
    line = _one_error_line(capsys, ["convert", "clip", str(KARLO / "text_encoder"),
                                    "--out", str(tmp_path / "c")])  # fmt: skip
    assert "--tokenizer" in line


def test_convert_clip_then_load(tmp_path):
    from unclip_jax.convert.clip import load_hf_clip
    from unclip_jax.pipelines.unclip import clip_from_run

    out = tmp_path / "clip"
    argv = ["convert", "clip", str(KARLO / "text_encoder"), "--out", str(out),
            "--tokenizer", str(KARLO / "tokenizer")]  # fmt: skip
    assert cli.main(argv) == 0
    encoder = clip_from_run(out)
    _assert_same(encoder.params, load_hf_clip(KARLO / "text_encoder")[1])
    assert encoder.text(["a red circle"])["text_emb"].shape == (1, 16)


# ------------------------------------------------------------------------------------------------
# inpaint


@pytest.fixture(scope="module")
def inpaint_run(tmp_path_factory):
    from unclip_jax.train.kinds import glide_kind

    config = config_utils.load_config("glide_inpaint64:tiny")
    workdir = tmp_path_factory.mktemp("inpaint_run")
    return save_random_run(workdir, config, glide_kind(config).init, seed=3)


def _write_pair(folder: pathlib.Path, size: int = 48, mask_size: int | None = None):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((mask_size or size,) * 2, np.uint8)
    mask[: (mask_size or size) // 2] = 255  # repaint the top half
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "image.png", folder / "mask.png"


def test_inpaint_keeps_the_black_pixels(inpaint_run, tmp_path):
    from unclip_jax.imaging import load_image

    image, mask = _write_pair(tmp_path)
    out = tmp_path / "out"
    argv = ["inpaint", str(image), str(mask), "a red circle", "a blue square", "--base",
            inpaint_run, "--steps", "4", "--guidance", "2.0", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "inpaint" and record["steps"] == 4
    size = config_utils.load_config("glide_inpaint64:tiny").model.unet.image_size
    given = (load_image(image, size) + 1) * 127.5
    files = sorted((out / "images").glob("*.png"))
    assert len(files) == 2
    for f in files:
        got = np.asarray(Image.open(f).convert("RGB"), np.float32)
        kept = slice(size // 2, None)
        # The bottom half (black in the mask) is the input, to 8-bit rounding.
        np.testing.assert_allclose(got[kept], given[kept], atol=1.0)
        # The repainted half is not (random weights paint noise there).
        assert np.abs(got[: size // 2] - given[: size // 2]).mean() > 10


def test_inpaint_user_errors(inpaint_run, tmp_path, capsys):
    image, mask = _write_pair(tmp_path, size=48, mask_size=40)
    line = _one_error_line(capsys, ["inpaint", str(image), str(mask), "x", "--base", inpaint_run])
    assert "mask" in line and "40x40" in line and "48x48" in line
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "black.png")
    line = _one_error_line(capsys, ["inpaint", str(image), str(tmp_path / "black.png"), "x",
                                    "--base", inpaint_run])  # fmt: skip
    assert "nothing to repaint" in line
    line = _one_error_line(capsys, ["inpaint", str(tmp_path / "none.png"), str(mask), "x",
                                    "--base", inpaint_run])  # fmt: skip
    assert "not found" in line
    with pytest.raises(SystemExit) as exc:
        cli.main(["inpaint", str(image), str(mask), "x", "--base", inpaint_run, "--guidance",
                  "lots"])  # fmt: skip
    assert exc.value.code == 2
