"""What each process of a multi-host launch will be told, without the cluster: the launch scripts'
`--dry-run` (launch/tpu_pod.sh, launch/slurm_gpu.sbatch) prints it.

    python -m unclip_jax.parallel.launch_plan tpu --accelerator-type v5p-32
    python -m unclip_jax.parallel.launch_plan slurm --nodelist 'gpu[001-002]' --ntasks-per-node 8

SLURM: every task's settings come from jax's own SLURM detection (the class
`jax.distributed.initialize()` uses, `parallel.distributed.initialize` -> "slurm"), run on the
environment srun would give that task: coordinator (the first node, a port from the job id),
process count and id, and the local device ids (the task's SLURM_LOCALID: one GPU per process;
all of the node's GPUs with PER_NODE=1). TPU: one process per host; jax reads the worker list and
the worker number from the TPU VM's metadata server, which only a TPU VM has, so the plan lists
the values that metadata holds for a slice of that type (workers in order, worker 0 coordinates
on jax's Cloud TPU port).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re

# Chips per host and TensorCores per chip (v4-N, v5p-N: N TensorCores, 2 per chip, 4 chips per
# host). v5e and v6e are left out: their single-host shapes (up to 8 chips on one host) follow
# another rule, not checked here.
_TPU_GENERATIONS = {"v4": (4, 2), "v5p": (4, 2)}


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list ('gpu[001-002,007],login1') as host names, in order."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}")
    return hosts


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def slurm_plan(*, job_id: int, nodelist: str, ntasks_per_node: int,
               gpus_per_node: int | None = None, per_node: bool = False) -> list[dict]:  # fmt: skip
    """One dict per task: host, the SLURM variables srun sets, and what jax derives from them."""
    from jax._src.clusters.slurm_cluster import SlurmCluster

    hosts = expand_nodelist(nodelist)
    ntasks = len(hosts) * ntasks_per_node
    plan = []
    for rank in range(ntasks):
        node, local = divmod(rank, ntasks_per_node)
        env = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": nodelist,
               "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(local), "SLURM_STEP_NUM_NODES": str(len(hosts))}  # fmt: skip
        with _environment(env):
            devices = [SlurmCluster.get_local_process_id()]
            if per_node:
                devices = list(range(gpus_per_node or ntasks_per_node))
            plan.append({
                "host": hosts[node], "slurm": env,
                "coordinator": SlurmCluster.get_coordinator_address(None, None),
                "num_processes": SlurmCluster.get_process_count(),
                "process_id": SlurmCluster.get_process_id(),
                "local_device_ids": devices,
            })  # fmt: skip
    return plan


def tpu_plan(accelerator_type: str, worker_ips: list[str] | None = None) -> list[dict]:
    """One dict per host of a single TPU slice of `accelerator_type` (e.g. 'v5p-32')."""
    from jax._src.clusters.cloud_tpu_cluster import coordinator_port

    generation, _, size = accelerator_type.partition("-")
    if generation not in _TPU_GENERATIONS or not size.isdigit():
        raise ValueError(f"unknown TPU accelerator type {accelerator_type!r}: expected one of "
                         f"{', '.join(g + '-N' for g in _TPU_GENERATIONS)}")  # fmt: skip
    chips_per_host, per_chip = _TPU_GENERATIONS[generation]
    chips = int(size) // per_chip
    hosts = max(1, chips // chips_per_host)
    ips = worker_ips or [f"10.0.0.{i + 2}" for i in range(hosts)]  # placeholders for the VM IPs
    if len(ips) != hosts:
        raise ValueError(f"{accelerator_type} has {hosts} hosts, got {len(ips)} worker IPs")
    return [{"worker": i, "ip": ip, "coordinator": f"{ips[0]}:{coordinator_port}",
             "num_processes": hosts, "process_id": i,
             "local_devices": min(chips, chips_per_host)} for i, ip in enumerate(ips)]  # fmt: skip


def format_plan(plan: list[dict]) -> str:
    lines = []
    for p in plan:
        if "slurm" in p:
            slurm = " ".join(f"{k}={v}" for k, v in p["slurm"].items()
                             if k in ("SLURM_PROCID", "SLURM_LOCALID"))  # fmt: skip
            lines.append(
                f"task {p['process_id']:>3} on {p['host']}: {slurm} -> jax.distributed("
                f"coordinator={p['coordinator']}, num_processes={p['num_processes']}, "
                f"process_id={p['process_id']}, local_device_ids={p['local_device_ids']})"
            )
        else:
            lines.append(
                f"worker {p['worker']} ({p['ip']}): jax.distributed(coordinator="
                f"{p['coordinator']}, num_processes={p['num_processes']}, process_id="
                f"{p['process_id']}), {p['local_devices']} local TPU chips"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cluster", required=True)
    tpu = sub.add_parser("tpu")
    tpu.add_argument("--accelerator-type", required=True, help="e.g. v5p-32, v4-64")
    tpu.add_argument("--worker-ips", default="", help="comma-separated, in worker order")
    slurm = sub.add_parser("slurm")
    slurm.add_argument("--job-id", type=int, default=12345)
    slurm.add_argument("--nodelist", required=True, help="SLURM's compact host list")
    slurm.add_argument("--ntasks-per-node", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, default=None)
    slurm.add_argument("--per-node", action="store_true", help="one process per node")
    args = parser.parse_args(argv)
    if args.cluster == "tpu":
        ips = [ip for ip in args.worker_ips.split(",") if ip] or None
        plan = tpu_plan(args.accelerator_type, ips)
    else:
        plan = slurm_plan(job_id=args.job_id, nodelist=args.nodelist,
                          ntasks_per_node=args.ntasks_per_node, gpus_per_node=args.gpus_per_node,
                          per_node=args.per_node)  # fmt: skip
    print(format_plan(plan))


if __name__ == "__main__":
    main()
