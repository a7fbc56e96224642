"""Multi-host: two local processes x 4 fake CPU devices train toy2d over one 8-device mesh
(jax.distributed on 127.0.0.1, gloo collectives), and agree with one process of 8 devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from unclip_jax import config_utils
from unclip_jax.checkpoint import Checkpointer
from unclip_jax.demo import toy2d
from unclip_jax.parallel import distributed
from unclip_jax.train import hooks

OVERRIDES = ["optim.steps=6", "train.log_every=2", "ckpt.save_every=6", "train.eval_every=3",
             "train.sample_every=6"]  # fmt: skip

# Each worker: join the run, then the same loop as `unclip-jax train`, with toy2d's hooks.
WORKER = """
import json, logging, sys, types
from unclip_jax.parallel import distributed
port, pid, workdir, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import jax
logging.basicConfig(level=logging.INFO,
                    format=f"[p{pid}] %(relativeCreated)d %(name)s: %(message)s")
logging.getLogger("absl").setLevel(logging.WARNING)
from unclip_jax import config_utils
from unclip_jax.demo import toy2d
from unclip_jax.train import hooks
from unclip_jax.train.loop import train
config = config_utils.load_config("toy2d:tiny", overrides)
base = toy2d.model_kind(config)
kind = types.SimpleNamespace(init=base.init, loss_fn=base.loss_fn, data=base.data,
                             eval_data=hooks.toy2d_eval_data(config),
                             sample=hooks.toy2d_sample(config))
summary = train(config, workdir, kind=kind)
print("RESULT " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
      "devices": jax.device_count(), "local": jax.local_device_count(), "step": summary["step"]}))
"""


REPO = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BothProcessStreams:
    """The global batch of a 2-process toy2d run, read by one process: process 0's host batch
    (the first half of the rows) then process 1's, as make_array_from_process_local_data lays
    them out on the mesh."""

    def __init__(self, config, global_batch):
        self.parts = [toy2d.ToyData(config, global_batch // 2, i) for i in range(2)]

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(p) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return self.parts[0].get_state()

    def set_state(self, state):
        for p in self.parts:
            p.set_state(state)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_train_like_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # fmt: skip
    for key in ("UNCLIP_COORDINATOR", "UNCLIP_NUM_PROCESSES", "UNCLIP_PROCESS_ID"):
        env.pop(key, None)
    worker = [sys.executable, "-c", WORKER, str(port)]
    procs = [
        subprocess.Popen(
            [*worker, str(i), str(two), *OVERRIDES],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        # The single-process reference runs meanwhile: 8 devices, the same global batches.
        config = config_utils.load_config("toy2d:tiny", OVERRIDES)
        base = toy2d.model_kind(config)
        kind = types.SimpleNamespace(
            init=base.init, loss_fn=base.loss_fn,
            data=lambda global_batch, *_: BothProcessStreams(config, global_batch),
            eval_data=hooks.toy2d_eval_data(config),  # no samples: they are not compared
        )  # fmt: skip
        from unclip_jax.train.loop import train

        train(config, one, kind=kind)
        deadline = time.time() + 120
        outputs = [p.communicate(timeout=max(1, deadline - time.time()))[0] for p in procs]
    finally:
        for p in procs:  # never leave a worker behind (a hung collective waits forever)
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    results = [json.loads(o.split("RESULT ")[1].splitlines()[0]) for o in outputs]
    assert [(r["process"], r["count"], r["devices"], r["local"], r["step"]) for r in results] == [
        (0, 2, 8, 4, 6), (1, 2, 8, 4, 6)]  # fmt: skip
    # Only process 0 logs and writes.
    assert "step 2 loss" in outputs[0] and "loss" not in outputs[1].split("RESULT")[0]
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["step_000006.png"]
    from PIL import Image

    assert Image.open(two / "samples" / "step_000006.png").size == (200, 200)  # 3 x 3 tiles of 64

    # The same numbers as one process on 8 devices (reductions may be ordered differently).
    train_two, train_one = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [m["step"] for m in train_two] == [m["step"] for m in train_one] == [2, 4, 6]
    for a, b in zip(train_two, train_one, strict=True):
        for key in ("loss", "mse", "vb", "grad_norm", "param_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    eval_two = read_jsonl(two / "eval_metrics.jsonl")
    eval_one = read_jsonl(one / "eval_metrics.jsonl")
    assert [m["step"] for m in eval_two] == [3, 6]
    for a, b in zip(eval_two, eval_one, strict=True):
        np.testing.assert_allclose(a["eval_ema_loss"], b["eval_ema_loss"], rtol=1e-5)

    # The two-process checkpoint restores in this single process, onto one device.
    on_one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    reference = Checkpointer(one / "checkpoints", enable_async=False)
    ref_state, _, _ = reference.restore(6)
    reference.close()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_one),
                          ref_state)  # fmt: skip
    restored = Checkpointer(two / "checkpoints", enable_async=False)
    assert restored.latest_step() == 6
    state, saved_config, data_state = restored.restore(6, target)
    restored.close()
    assert data_state == {"index": 6} and saved_config["optim"]["steps"] == 6
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ initialize() without a cluster


def test_initialize_single_process_and_partial_settings(monkeypatch):
    for key in ("UNCLIP_COORDINATOR", "UNCLIP_NUM_PROCESSES", "UNCLIP_PROCESS_ID",
                "UNCLIP_LOCAL_DEVICE_IDS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append((a, k)))
    assert distributed.initialize() is False
    assert distributed.initialize("127.0.0.1:1234", num_processes=1, process_id=0) is False
    with pytest.raises(ValueError, match="missing num_processes, process_id"):
        distributed.initialize("127.0.0.1:1234")
    monkeypatch.setenv("UNCLIP_PROCESS_ID", "3")
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", num_processes=2)
    monkeypatch.setenv("UNCLIP_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="UNCLIP_NUM_PROCESSES must be an integer"):
        distributed.initialize()
    assert called == []

    # Flags and the environment combine; the CLI parser hands them over unchanged.
    monkeypatch.setenv("UNCLIP_NUM_PROCESSES", "2")
    monkeypatch.setenv("UNCLIP_PROCESS_ID", "1")
    monkeypatch.setattr(distributed, "_log_topology", lambda: None)
    import argparse

    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args(["--coordinator", "10.0.0.1:99", "--local_device_ids", "0,1"])
    assert distributed.from_args(args) is True
    assert called == [(("10.0.0.1:99",), {"num_processes": 2, "process_id": 1,
                                          "local_device_ids": [0, 1]})]  # fmt: skip
