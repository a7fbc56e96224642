"""The command line and config loading: the toy demo end to end (the shapes demo is
tests/test_demo.py), and one-line user errors."""

import importlib
import json
import subprocess
import sys

import pytest

from unclip_jax import cli, config_utils


def test_config_overrides_and_errors():
    config = config_utils.load_config("toy2d:tiny", ["optim.lr=0.01", "diffusion.schedule=linear"])
    assert config.optim.lr == 0.01 and config.diffusion.schedule == "linear"
    with pytest.raises(KeyError, match="unknown config key 'optim.lrr'"):
        config_utils.load_config("toy2d:tiny", ["optim.lrr=1"])
    with pytest.raises(TypeError, match="'optim.steps' expects int"):
        config_utils.load_config("toy2d:tiny", ["optim.steps=many"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        config_utils.load_config("nope:tiny")
    with pytest.raises(ValueError, match="unknown toy2d variant"):
        config_utils.load_config("toy2d:huge")


def test_demo_runs_then_reuses_its_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--config", "toy2d:tiny", "--out", str(out)]) == 0
    report = json.loads((out / "toy2d.json").read_text())
    assert (out / "toy2d.png").stat().st_size > 1000
    assert {r["sampler"] for r in report["results"]} == {"ddpm", "ddim", "dpm++2m"}
    assert report["train_history"] is not None
    assert all(0.0 <= r["faithfulness"] <= 1.0 for r in report["results"])
    # A second run with the same config loads the saved weights instead of training.
    assert cli.main(["demo", "--config", "toy2d:tiny", "--out", str(out)]) == 0
    assert json.loads((out / "toy2d.json").read_text())["train_history"] is None
    assert "diffusion-core toy demo" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(capsys):
    assert cli.main(["demo", "--config", "toy2d:tiny", "--set", "optim.nope=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["unclip-jax demo: error: unknown config key 'optim.nope'"]
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2


def _one_error_line(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_sample_user_errors(tmp_path, capsys):
    missing = tmp_path / "no_run"
    line = _one_error_line(capsys, ["sample", "--base", str(missing), "a red circle"])
    assert f"no run at {missing}" in line
    assert "no prompts" in _one_error_line(capsys, ["sample", "--base", str(missing)])
    (tmp_path / "checkpoints").mkdir()
    line = _one_error_line(capsys, ["sample", "--base", str(tmp_path), "a red circle"])
    assert "no checkpoint in" in line
    # A guidance scale that is not a number: argparse's usage error, exit code 2.
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "--base", str(tmp_path), "x", "--guidance", "strong"])
    assert exc.value.code == 2
    assert "invalid float value: 'strong'" in capsys.readouterr().err
    # CLIP guidance replaces classifier-free guidance, and guides GLIDE only.
    argv = ["sample", "x", "--base", str(tmp_path), "--clip-guidance", str(missing)]
    line = _one_error_line(capsys, [*argv, "--guidance", "3"])
    assert "--clip-guidance replaces classifier-free guidance" in line
    line = _one_error_line(capsys, [*argv, "--pipeline", "unclip"])
    assert "--clip-guidance guides GLIDE's base stage" in line


def test_help_does_not_import_jax():
    # `unclip-jax <command> --help` builds every parser; the packages' lazy exports keep JAX, Flax
    # and tfds out of that (2.9 s -> 0.4 s on the 2-core machine).
    code = ("import sys; from unclip_jax import cli; cli.build_parser(); "
            "print(sorted(m for m in ('jax', 'flax', 'tensorflow_datasets', 'grain') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("package", ["unclip_jax.data", "unclip_jax.eval", "unclip_jax.parallel"])
def test_lazy_package_exports_resolve(package):
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(module._EXPORTS)
    for name in module.__all__:
        value = getattr(module, name)
        assert value is getattr(importlib.import_module(f"{package}.{module._EXPORTS[name]}"), name)
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018


def test_clip_guidance_needs_a_noise_aware_clip_of_the_base_size(tmp_path):
    import types

    from run_fixtures import make_random_runs

    from unclip_jax.pipelines.glide import clip_guidance_from_run

    runs = make_random_runs(tmp_path, names=("clip",))
    stage = types.SimpleNamespace(model=types.SimpleNamespace(image_size=16),
                                  diffusion=types.SimpleNamespace(num_timesteps=1000))  # fmt: skip
    with pytest.raises(ValueError, match="without a noise-aware image tower"):
        clip_guidance_from_run(runs["clip"], ["a red circle"], 3.0, stage=stage)
