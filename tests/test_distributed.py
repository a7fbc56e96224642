"""Multi-host: two local processes x 4 fake CPU devices train a tiny CLIP on `shapes` over one
8-device mesh (jax.distributed on 127.0.0.1, gloo collectives), each reading its own shard of the
data, and agree with one process of 8 devices fed the same global batches."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from distributed_worker import example_id, recording

from unclip_jax import config_utils
from unclip_jax.checkpoint import Checkpointer
from unclip_jax.data import loader, shapes_builder
from unclip_jax.parallel import distributed
from unclip_jax.train.unclip_kinds import clip_pixels, clip_tokenizer_for_run

# The cheapest real kind on CPU (a tiny GLIDE's train step compiles ~5x slower), one layer per
# tower, no sample grid (CLIP's costs ~20 s here). Adam's eps is raised from 1e-6: the attention
# key biases have a zero gradient up to rounding (~1e-9), which differs between the two reduction
# orders, and eps 1e-6 would turn it into steps of ~lr / 300 that the params comparison sees.
CONFIG = "clip_vit_b32:tiny"
OVERRIDES = ["optim.steps=4", "optim.batch_size=8", "optim.warmup_steps=1", "optim.eps=1e-3",
             "model.text.layers=1", "model.vision.layers=1", "train.log_every=2",
             "train.sample_every=0", "ckpt.save_every=4"]  # fmt: skip

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = pathlib.Path(__file__).resolve().parent / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BothProcessStreams:
    """The global batches of a 2-process run, read by one process: process 0's host batch (the
    first half of the rows) then process 1's, as make_array_from_process_local_data lays them
    out on the mesh. `make` is a kind's data or eval_data."""

    def __init__(self, make, global_batch):
        self.parts = [make(global_batch, i, 2) for i in range(2)]

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(p) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return self.parts[0].get_state()  # what process 0 saves in the two-process run

    def set_state(self, state):
        for p in self.parts:
            p.set_state(state)


def both_processes(make):
    return lambda global_batch, *_: BothProcessStreams(make, global_batch)


def shapes_indices(config, image_size: int) -> dict[str, int]:
    """example_id -> index in the shapes split, for every example of config.data's split."""
    source = shapes_builder.build_shapes(config.data.dir, config.data.config).as_data_source(
        config.data.split
    )
    decode = loader.DecodeExample(image_size=image_size)
    # As the clip kind feeds them to the train step: CLIP-normalised.
    ids = {example_id(clip_pixels(decode.map(source[i])["image"])): i
           for i in range(len(source))}  # fmt: skip
    assert len(ids) == len(source)  # no two images alike: an id names one example
    return ids


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_train_like_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    overrides = [*OVERRIDES, f"data.dir={tmp_path / 'data'}"]
    config = config_utils.load_config(CONFIG, overrides)
    # Built once before the workers start: two processes preparing one folder would race. So
    # would the BPE that process 0 saves in the run while process 1 looks for it.
    index_of = shapes_indices(config, config.model.vision.image_size)
    clip_tokenizer_for_run(config, two)
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # fmt: skip
    for key in ("UNCLIP_COORDINATOR", "UNCLIP_NUM_PROCESSES", "UNCLIP_PROCESS_ID"):
        env.pop(key, None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(two), CONFIG, *overrides],
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
        from unclip_jax.train.kinds import get_kind
        from unclip_jax.train.loop import train

        base = get_kind(config, one)  # its own BPE, from the same captions
        kind, reference_fed = recording(base, both_processes(base.data))
        train(config, one, kind=kind)
        deadline = time.time() + 180
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
        (0, 2, 8, 4, 4), (1, 2, 8, 4, 4)]  # fmt: skip
    # Only process 0 logs and writes.
    assert "step 2 loss" in outputs[0] and "loss" not in outputs[1].split("RESULT")[0]
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1

    # Each process fed its own examples: per step, the two host batches are disjoint, from
    # grain's contiguous halves of the split, and together the one-process global batch.
    def indices(batches):
        return [[index_of[e] for e in batch] for batch in batches]

    fed = [indices(json.loads((two / f"fed_{i}.json").read_text())) for i in range(2)]
    reference = indices(reference_fed)
    assert len(fed[0]) == len(fed[1]) == len(reference) == 4
    half = len(index_of) // 2
    for first, second, both in zip(*fed, reference, strict=True):
        assert len(first) == len(second) == 4 and not set(first) & set(second)
        assert sorted(first + second) == sorted(both)
        assert max(first) < half <= min(second)
    assert len({i for batch in reference for i in batch}) == 4 * 8  # no repeats within an epoch

    # The same numbers as one process on 8 devices (reductions may be ordered differently).
    train_two, train_one = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [m["step"] for m in train_two] == [m["step"] for m in train_one] == [2, 4]
    for a, b in zip(train_two, train_one, strict=True):
        for key in ("loss", "logit_scale", "grad_norm", "param_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)

    # The two-process checkpoint restores in this single process, onto one device.
    on_one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    reference_ckpt = Checkpointer(one / "checkpoints", enable_async=False)
    ref_state, _, ref_data_state = reference_ckpt.restore(4)
    reference_ckpt.close()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_one),
                          ref_state)  # fmt: skip
    restored = Checkpointer(two / "checkpoints", enable_async=False)
    assert restored.latest_step() == 4
    state, saved_config, data_state = restored.restore(4, target)
    restored.close()
    assert data_state == ref_data_state and saved_config["optim"]["steps"] == 4
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
