"""The launch scripts' --dry-run, against the exact output expected for a 4-host TPU v5p slice
(launch/tpu_pod.sh) and a 2-node x 8-GPU SLURM allocation (launch/slurm_gpu.sbatch): the commands
they would run and each process's jax.distributed settings (from jax's own SLURM detection)."""

import os
import pathlib
import subprocess
import sys

import pytest

from unclip_jax.parallel import launch_plan

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = ["--config", "glide_base64", "--workdir", "/shared/runs/glide 64", "--set", "optim.lr=1e-4"]


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
    done = subprocess.run(["bash", str(ROOT / "launch" / script), "--dry-run", *args],
                          env=clean | {"PLAN_PYTHON": sys.executable} | env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_tpu_pod_dry_run_for_a_4_host_v5p_slice():
    lines = dry_run("tpu_pod.sh", *TRAIN, TPU_NAME="pod-a", ZONE="us-east5-a",
                    ACCELERATOR_TYPE="v5p-32", PROJECT="proj")  # fmt: skip
    remote = ("cd ~/unclip-jax && nohup unclip-jax -v train --config glide_base64 --workdir "
              "/shared/runs/glide\\ 64 --set optim.lr=1e-4 > ~/unclip-jax-train.log 2>&1 < "
              "/dev/null & echo $! > ~/unclip-jax-train.pid; sleep 2; tail -n 5 "
              "~/unclip-jax-train.log")  # fmt: skip
    assert lines[0] == ("gcloud compute tpus tpu-vm ssh 'pod-a' --zone 'us-east5-a' --project "
                        f"'proj' --worker=all --command '{remote}'")  # fmt: skip
    assert lines[1].startswith("per worker of pod-a (v5p-32")
    assert lines[2:] == [
        f"worker {i} (10.0.0.{i + 2}): jax.distributed(coordinator=10.0.0.2:8482, "
        f"num_processes=4, process_id={i}), 4 local TPU chips"
        for i in range(4)
    ]
    stop = dry_run("tpu_pod.sh", "--stop", TPU_NAME="pod-a", ZONE="z")
    assert stop == ["gcloud compute tpus tpu-vm ssh 'pod-a' --zone 'z' --worker=all --command "
                    "'[ -f ~/unclip-jax-train.pid ] && kill -TERM $(cat ~/unclip-jax-train.pid)"
                    " || true'"]  # fmt: skip


def test_slurm_dry_run_for_2_nodes_of_8_gpus():
    lines = dry_run("slurm_gpu.sbatch", *TRAIN)
    assert lines[0] == "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"
    assert lines[1] == ("exec srun --kill-on-bad-exit=1 unclip-jax -v train --config glide_base64 "
                        "--workdir /shared/runs/glide\\ 64 --set optim.lr=1e-4 ")  # fmt: skip
    assert lines[2] == "per task (nodes node[001-002], 8 tasks per node, job 12345):"
    tasks = lines[3:]
    assert len(tasks) == 16
    # Job 12345: port 12345 % 4096 + 61440 on the first node (jax's SLURM rule).
    for rank, line in enumerate(tasks):
        node, local = divmod(rank, 8)
        assert line == (
            f"task {rank:>3} on node00{node + 1}: SLURM_PROCID={rank} SLURM_LOCALID={local} -> "
            f"jax.distributed(coordinator=node001:61497, num_processes=16, process_id={rank}, "
            f"local_device_ids=[{local}])"
        )
    # One process per node: each takes all 8 GPUs of its node.
    per_node = dry_run("slurm_gpu.sbatch", *TRAIN, PER_NODE="1", SLURM_JOB_ID="7")
    assert per_node[0].endswith("UNCLIP_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7")
    assert per_node[3:] == [
        f"task   {r} on node00{r + 1}: SLURM_PROCID={r} SLURM_LOCALID=0 -> jax.distributed("
        f"coordinator=node001:61447, num_processes=2, process_id={r}, "
        "local_device_ids=[0, 1, 2, 3, 4, 5, 6, 7])"
        for r in range(2)
    ]


def test_nodelists_and_tpu_types():
    assert launch_plan.expand_nodelist("gpu[001-003,010],login1") == [
        "gpu001", "gpu002", "gpu003", "gpu010", "login1"]  # fmt: skip
    assert launch_plan.tpu_plan("v4-64")[0]["num_processes"] == 8  # 32 chips, 4 per host
    single = launch_plan.tpu_plan("v5p-8")  # 4 chips: one host
    assert len(single) == 1 and single[0]["local_devices"] == 4
    with pytest.raises(ValueError, match="unknown TPU accelerator type"):
        launch_plan.tpu_plan("v5litepod-16")
