"""`unclip-jax data prepare`: builds shapes (reused the second time) and names bad datasets."""

from unclip_jax import cli


def test_data_prepare_builds_then_reuses(tmp_path, capsys):
    argv = ["data", "prepare", "--dataset", "shapes:tiny", "--data_dir", str(tmp_path)]
    assert cli.main(argv) == 0
    assert "train 256, validation 64" in capsys.readouterr().out
    built = sorted(p.name for p in (tmp_path / "shapes" / "tiny" / "1.0.0").iterdir())
    assert cli.main(argv) == 0  # a second call reuses the build
    assert sorted(p.name for p in (tmp_path / "shapes" / "tiny" / "1.0.0").iterdir()) == built
    capsys.readouterr()
    assert cli.main(["data", "prepare", "--dataset", "cats", "--data_dir", str(tmp_path)]) == 2
    assert "unknown dataset 'cats'" in capsys.readouterr().err
