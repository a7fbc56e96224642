"""Damaged runs (issue 21): a cut-short or half-written checkpoint step is named in one line with
the intact steps beside it, `--step` reads one of those, training resumes from the newest intact
step exactly, and a save killed midway is never taken for complete."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.run_fixtures import CONFIGS, _init_fn, make_random_runs, save_random_run
from unclip_jax import cli, config_utils
from unclip_jax.checkpoint import Checkpointer, DamagedCheckpoint, load_run, split_run_path


def cut_data_files(step_dir) -> int:
    """Cut every array-data file of a saved step to half its size (a crashed copy)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for p in files:
        os.truncate(p, p.stat().st_size // 2)
    return len(files)


def sizes(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def small_state(step: int):
    return {"params": {"w": jnp.full((64, 64), float(step)), "b": jnp.arange(8.0) + step},
            "ema_params": {"w": jnp.zeros((64, 64)) - step, "b": jnp.zeros(8)}}  # fmt: skip


@pytest.fixture
def three_steps(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    ckpt = Checkpointer(folder)
    for step in (100, 150, 200):
        ckpt.save(step, small_state(step), config={"kind": "test", "step": step}, force=True)
    ckpt.close()
    return folder


def test_a_cut_short_step_is_named_with_the_intact_ones(three_steps):
    folder = three_steps
    ckpt = Checkpointer(folder, enable_async=False)
    assert [ckpt.problem(s) for s in (100, 150, 200)] == [None, None, None]
    assert all((folder / str(s) / "unclip_manifest.json").is_file() for s in (100, 150, 200))
    assert cut_data_files(folder / "200") > 0
    problem = ckpt.problem(200)
    assert problem is not None and "bytes" in problem, problem
    with pytest.raises(DamagedCheckpoint) as err:
        ckpt.restore()
    message = str(err.value)
    assert "\n" not in message
    assert "checkpoint step 200 is damaged" in message and "intact steps: 150, 100" in message
    assert f"run {folder.parent}" in message and str(folder / "150") in message
    # A step asked for by number, or by its path, reads normally.
    assert float(ckpt.restore(150)[0]["params"]["b"][0]) == 150
    ckpt.close()
    assert split_run_path(folder / "150") == (folder.parent, folder, 150)
    config, params = load_run(folder / "150")
    assert config.step == 150 and float(params["w"][0, 0]) == -150  # the EMA params
    with pytest.raises(DamagedCheckpoint, match="step 200 is damaged"):
        load_run(folder.parent)


def test_damage_the_manifest_cannot_see_is_found_by_the_restore(three_steps):
    # A step written before manifests existed (or whose manifest is lost), then cut short: the
    # restore's own error (tensorstore's OUT_OF_RANGE) becomes the same one-line report.
    folder = three_steps
    (folder / "200" / "unclip_manifest.json").unlink()
    cut_data_files(folder / "200")
    ckpt = Checkpointer(folder, enable_async=False)
    assert ckpt.problem(200) is None
    with pytest.raises(DamagedCheckpoint) as err:
        ckpt.restore(200)
    assert "OUT_OF_RANGE" in err.value.problem and err.value.intact == [150, 100]
    # Bit rot: OCDBT's node checksums catch it (DATA_LOSS).
    (folder / "150" / "unclip_manifest.json").unlink()
    for p in (folder / "150" / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            data = bytearray(p.read_bytes())
            data[len(data) // 3] ^= 0xFF
            p.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="step 150 is damaged"):
        ckpt.restore(150)
    # A target that does not fit the saved arrays is the caller's mistake, not damage.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3,) + x.shape, x.dtype, sharding=device),
                         small_state(0))  # fmt: skip
    with pytest.raises(ValueError) as err:
        ckpt.restore(100, wrong)
    assert not isinstance(err.value, DamagedCheckpoint)
    ckpt.close()


def test_restore_newest_intact_sets_damaged_steps_aside_without_losing_a_byte(three_steps):
    folder = three_steps
    cut_data_files(folder / "200")
    (folder / "150" / "state" / "manifest.ocdbt").write_bytes(b"\0not a manifest")
    before = {s: sizes(folder / s) for s in ("150", "200")}
    ckpt = Checkpointer(folder, enable_async=False)
    step, (state, config, _), aside = ckpt.restore_newest_intact()
    assert step == 100 and config["step"] == 100 and float(state["params"]["b"][0]) == 100
    assert [s for s, _, _ in aside] == [200, 150]
    assert ckpt.all_steps() == [100]
    for s, _, moved in aside:
        assert moved.parent == folder.with_name("checkpoints.damaged")
        assert sizes(moved) == before[str(s)]  # renamed, not deleted or altered
    ckpt.close()


def test_sample_names_the_damaged_decoder_step_and_step_selects_an_intact_one(tmp_path, capfd):
    runs = make_random_runs(tmp_path, names=("clip",))
    decoder = tmp_path / "decoder"
    config = config_utils.load_config(CONFIGS["decoder"])
    for seed, step in enumerate((100, 150, 200)):
        save_random_run(decoder, config, _init_fn("decoder", config), seed=seed, step=step)
    cut_data_files(decoder / "checkpoints" / "200")
    out = tmp_path / "samples"
    argv = ["sample", "--pipeline", "unclip", "--clip", runs["clip"], "--decoder", str(decoder),
            "--prior", "none", "--steps", "2", "--out", str(out), "a red square"]  # fmt: skip
    assert cli.main(argv) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err[-3000:]
    assert f"run {decoder}: checkpoint step 200 is damaged" in lines[0]
    assert "intact steps: 150, 100" in lines[0] and "--step decoder=150" in lines[0]
    assert not out.exists()
    # Two runs on the command line: a bare step number must say which run it is for.
    assert cli.main([*argv, "--step", "150"]) == 2
    assert "name the run, e.g. --step decoder=150" in capfd.readouterr().err
    assert cli.main([*argv, "--step", "decoder=999"]) == 2
    assert "has no checkpoint step 999 (it holds 200, 150, 100)" in capfd.readouterr().err
    assert cli.main([*argv, "--step", "decoder=150"]) == 0
    captured = capfd.readouterr()
    assert captured.err == "", captured.err[-3000:]
    record = json.loads((out / "record.json").read_text())
    assert record["runs"]["decoder"] == str(decoder / "checkpoints" / "150")
    assert (out / "grid.png").is_file()


NO_HOOKS = ["train.eval_every=0", "train.sample_every=0", "train.tensorboard=False"]


def test_training_resumes_from_the_newest_intact_step_exactly(tmp_path, caplog):
    from unclip_jax.train.loop import train

    settings = ["optim.steps=24", "ckpt.save_every=8", "ckpt.keep=3", "train.log_every=8",
                *NO_HOOKS]  # fmt: skip
    workdir = tmp_path / "run"
    train(config_utils.load_config("toy2d:tiny", settings), workdir)
    folder = workdir / "checkpoints"
    ckpt = Checkpointer(folder, enable_async=False)
    assert ckpt.all_steps() == [8, 16, 24]
    straight = jax.tree.map(np.asarray, ckpt.restore(24)[0]["params"])
    ckpt.close()
    cut_data_files(folder / "24")
    damaged = sizes(folder / "24")
    with caplog.at_level(logging.WARNING, logger="unclip_jax.train.loop"):
        summary = train(config_utils.load_config("toy2d:tiny", settings), workdir)
    assert summary["step"] == 24
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "checkpoint step 24 is damaged" in warnings[0], warnings
    (moved,) = (workdir / "checkpoints.damaged").iterdir()
    assert moved.name.startswith("24-") and sizes(moved) == damaged
    ckpt = Checkpointer(folder, enable_async=False)
    state, _, data = ckpt.restore(24)
    ckpt.close()
    assert data == {"index": 24}  # resumed at step 16's data position: no batch lost or repeated
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in records if "event" in r]
    assert event["event"] == "damaged_checkpoint" and event["damaged_step"] == 24
    assert event["resumed_from"] == 16 and event["set_aside"] == str(moved)


SAVER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from unclip_jax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], max_to_keep=100)
    for step in range(1, 1000):
        state = {"params": {"w": jnp.full((2048, 1024), float(step)),
                            "v": jnp.full((1024, 1024), float(-step))}}
        ckpt.save(step, state, config={"step": step}, force=True)
        print("started", step, flush=True)
""")


@pytest.mark.parametrize("delay_s", [0.0, 0.15, 0.4])
def test_a_save_killed_midway_is_never_taken_for_complete(tmp_path, delay_s):
    folder = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(folder)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    started = 0
    try:
        for line in proc.stdout:
            started = int(line.split()[1])
            if started == 3:
                break
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        started = max([started] + [int(x.split()[1]) for x in proc.stdout.read().splitlines()])
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = Checkpointer(folder, enable_async=False)
    step, (state, config, _), _ = ckpt.restore_newest_intact()
    ckpt.close()
    # The save before the last one started had completed (orbax waits for it): nothing older
    # than that is ever what a resume falls back to, and whatever it takes holds that step.
    assert step >= started - 1, (step, started)
    assert config == {"step": step}
    assert np.all(np.asarray(state["params"]["w"]) == step)
    assert np.all(np.asarray(state["params"]["v"]) == -step)
