"""The training loop as users run it: exact resume after SIGKILL, SIGTERM saves and exits 0,
init_from, metrics. Runs `unclip-jax train` in subprocesses on the 8 fake devices."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from run_fixtures import assert_identical_runs, final_params

from unclip_jax import config_utils

# Held-out loss and sample grids off: test_distributed covers them, and they cost compilations.
# TensorBoard off in subprocesses: tensorboardX imports torch when it is installed (~2 s).
NO_HOOKS = ["train.eval_every=0", "train.sample_every=0", "train.tensorboard=False"]
SETTINGS = ["optim.steps=24", "ckpt.save_every=1", "train.log_every=4", *NO_HOOKS]
TINY = ["--config", "toy2d:tiny", *(arg for item in SETTINGS for arg in ("--set", item))]


def command(workdir, *extra):
    return [sys.executable, "-m", "unclip_jax.cli", "train", *TINY, *extra, "--workdir",
            str(workdir)]  # fmt: skip


def wait_for_checkpoint(workdir, at_least, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*") if p.name.isdigit()]
        if steps and max(steps) >= at_least:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.returncode}")
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def test_exact_resume_after_sigkill(tmp_path):
    from unclip_jax.train.loop import train

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    proc = subprocess.Popen(command(broken), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(broken, 3, proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        killed_at, _, _ = final_params(broken)
        assert 3 <= killed_at < 24, killed_at
        # The command resumes (saving only at the end: each save costs ~0.4 s of CPU);
        # meanwhile the uninterrupted reference trains in this process (same flags, same 8
        # devices: the same executable).
        resume = command(broken, "--set", "ckpt.save_every=24")
        proc = subprocess.Popen(resume, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        settings = [*SETTINGS, "ckpt.save_every=24", "train.tensorboard=True"]
        train(config_utils.load_config("toy2d:tiny", settings), straight)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    step, data = assert_identical_runs(straight, broken)
    assert step == 24 and data == {"index": 24}  # the same batches, none skipped or repeated
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [4, 8, 12, 16, 20, 24]
    assert {"loss", "mse", "vb", "grad_norm", "param_norm", "learning_rate", "steps_per_s",
            "examples_per_s"} <= set(lines[-1])  # fmt: skip
    # The writers beside the JSONL: compile time and memory analysis, TensorBoard events.
    compiled = json.loads((straight / "compile.json").read_text())
    assert compiled["step"] == 0 and compiled["compile_s"] > 0 and "temp_mib" in compiled
    assert len(list((straight / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
    workdir = tmp_path / "run"
    extra = ["--set", "optim.steps=100000", "--set", "ckpt.save_every=100000"]
    proc = subprocess.Popen(command(workdir, *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for_metrics = time.time() + 120
    while not (workdir / "metrics.jsonl").is_file() and time.time() < wait_for_metrics:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    step, _, data = final_params(workdir)
    assert 0 < step < 100000 and data == {"index": step}
    assert f"trained to step {step}" in out


def test_init_from_takes_params_when_the_workdir_is_empty(tmp_path):
    from unclip_jax.train.loop import train

    source = tmp_path / "source"
    config = config_utils.load_config("toy2d:tiny", [*NO_HOOKS, "optim.steps=10",
                                                     "ckpt.save_every=10"])  # fmt: skip
    train(config, source)
    _, source_params, _ = final_params(source)
    config = config_utils.load_config(
        "toy2d:tiny",
        [*NO_HOOKS, "optim.steps=1", "optim.lr=0.0", f"ckpt.init_from={source / 'checkpoints'}"],
    )
    train(config, tmp_path / "target")
    step, params, _ = final_params(tmp_path / "target")
    assert step == 1  # a fresh run (step 0) that started from the source's params
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(source_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


@pytest.mark.parametrize("bad", ["mesh=(('data', 3),)", "sharding_rules=nonsense"])
def test_bad_training_configs_are_named(tmp_path, bad):
    from unclip_jax.train.loop import train

    config = config_utils.load_config("toy2d:tiny", [bad])
    with pytest.raises(ValueError, match="needs 3 devices|unknown sharding preset"):
        train(config, tmp_path)


def test_a_run_of_nonfinite_steps_stops_training(tmp_path):
    """lr 1e30 sends the params to ~1e30 after one step; every later loss is non-finite and
    skipped, so the run stops once max_nonfinite_in_row of them follow each other."""
    from unclip_jax.train.loop import TrainingDiverged, train

    config = config_utils.load_config("toy2d:tiny", [*NO_HOOKS, "optim.lr=1e30",
                                                     "optim.grad_clip=0.0",
                                                     "train.max_nonfinite_in_row=7"])  # fmt: skip
    with pytest.raises(TrainingDiverged, match="non-finite steps in a row"):
        train(config, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_total"] >= 7 and lines[-1]["step"] < 40
