"""Multi-host initialisation: one call before anything touches a device (DESIGN: parallel/).

    from unclip_jax.parallel import distributed
    distributed.initialize()                                    # from the environment, or nothing
    distributed.initialize("10.0.0.1:1234", num_processes=4, process_id=2)   # explicit

Where the settings come from, first match wins:
1. explicit arguments (the CLI's --coordinator / --num_processes / --process_id);
2. UNCLIP_COORDINATOR / UNCLIP_NUM_PROCESSES / UNCLIP_PROCESS_ID (and UNCLIP_LOCAL_DEVICE_IDS);
3. a detected cluster: SLURM with more than one task, Open MPI with more than one rank, or a Cloud
   TPU VM; then jax's own detection fills in everything (`jax.distributed.initialize()`);
4. otherwise a single process: nothing is initialised.

The coordinator, the process count and the process id go together: giving some of them is an
error that names the missing ones. On CPU, cross-process collectives use gloo, set before
`jax.distributed.initialize` (DESIGN pitfalls).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os

log = logging.getLogger(__name__)

ENV_COORDINATOR = "UNCLIP_COORDINATOR"
ENV_NUM_PROCESSES = "UNCLIP_NUM_PROCESSES"
ENV_PROCESS_ID = "UNCLIP_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "UNCLIP_LOCAL_DEVICE_IDS"


class DistributedConfigError(ValueError):
    """Inconsistent multi-host settings (a ValueError: the CLI reports it in one line)."""


def _int_or_none(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{name} must be an integer, got {value!r}") from None


def _device_ids(value) -> list[int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise DistributedConfigError(
                f"local device ids must be comma-separated integers, got {value!r}"
            ) from None
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def detect_cluster() -> str | None:
    """The multi-process launcher this process runs under, as jax names it, or None.

    Only launchers that start several processes count: "slurm" (SLURM_NTASKS > 1 inside a job
    step), "ompi" (OMPI_COMM_WORLD_SIZE > 1) and "tpu" (a Cloud TPU VM, where jax asks the
    metadata server for the workers; a single-host TPU VM is a cluster of one). Kubernetes and
    mpi4py are not guessed: pass explicit settings there. Under SLURM and Open MPI jax gives
    each process one device, its local rank (one process per GPU); for one process per node,
    pass all of the node's devices as local_device_ids.
    """
    env = os.environ
    in_slurm_step = "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env
    if in_slurm_step and (_int_or_none(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if (_int_or_none(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    try:  # set when jax is imported on a TPU VM; a private name, so guarded
        from jax._src import cloud_tpu_init

        if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
            return "tpu"
    except ImportError:
        pass
    return None


def _cpu_only() -> bool:
    """Whether this process will run on CPU (checked without initialising a backend)."""
    import jax

    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    plugins = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin",
               "libtpu")  # fmt: skip
    return not any(importlib.util.find_spec(p) for p in plugins)


def _use_gloo_on_cpu() -> None:
    import jax

    if not _cpu_only():
        return
    if jax.config.jax_cpu_collectives_implementation != "mpi":  # keep an explicit choice of MPI
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("CPU platform: cross-process collectives via %s",
             jax.config.jax_cpu_collectives_implementation)  # fmt: skip


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
) -> bool:
    """Initialise the JAX distributed system if this is a multi-process run.

    Returns True when `jax.distributed.initialize` was called, False for a single process.
    Must run before any device is used (jax raises otherwise). See the module docstring for
    where the settings come from.
    """
    import jax

    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _int_or_none(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _int_or_none(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    local_device_ids = _device_ids(
        local_device_ids if local_device_ids is not None else env.get(ENV_LOCAL_DEVICE_IDS)
    )
    given = {"coordinator": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}  # fmt: skip

    if all(v is None for v in given.values()):
        cluster = detect_cluster()
        if cluster is None:
            if local_device_ids is not None:
                raise DistributedConfigError(
                    "local device ids were given without a multi-process run (no coordinator, "
                    "process count and process id, and no cluster detected)"
                )
            log.info("single process: jax.distributed is not initialised")
            return False
        _use_gloo_on_cpu()
        log.info("%s cluster detected: jax.distributed.initialize() detects the rest", cluster)
        method = cluster if cluster in ("slurm", "ompi") else None  # TPU: jax picks GCE or GKE
        jax.distributed.initialize(local_device_ids=local_device_ids,
                                   cluster_detection_method=method)  # fmt: skip
        _log_topology()
        return True

    missing = [name for name, v in given.items() if v is None]
    if missing:
        raise DistributedConfigError(
            "multi-process settings go together: missing " + ", ".join(missing) + " (flags "
            f"--coordinator, --num_processes, --process_id or {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})"
        )
    if num_processes < 1:
        raise DistributedConfigError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise DistributedConfigError(
            f"process_id must be in [0, {num_processes}), got {process_id}"
        )
    if ":" not in coordinator_address:
        raise DistributedConfigError(
            f"coordinator must be host:port (process 0's address), got {coordinator_address!r}"
        )
    if num_processes == 1:
        log.info("num_processes is 1: jax.distributed is not initialised")
        return False
    _use_gloo_on_cpu()
    log.info("joining %s as process %d of %d", coordinator_address, process_id, num_processes)
    jax.distributed.initialize(
        coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    _log_topology()
    return True


def _log_topology() -> None:
    import jax

    log.info("process %d of %d: %d local devices, %d in all (%s)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count(),
             jax.default_backend())  # fmt: skip


# ------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--coordinator, --num_processes, --process_id, --local_device_ids (all optional)."""
    group = parser.add_argument_group(
        "multi-host",
        "Give all three of --coordinator/--num_processes/--process_id (or the UNCLIP_* "
        "environment variables) to join a multi-process run; on SLURM, Open MPI and Cloud TPU "
        "VMs they are detected. Without them and outside a cluster: one process.",
    )
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help=f"process 0's address (env {ENV_COORDINATOR})")  # fmt: skip
    group.add_argument("--num_processes", type=int, default=None,
                       help=f"number of processes (env {ENV_NUM_PROCESSES})")  # fmt: skip
    group.add_argument(
        "--process_id",
        type=int,
        default=None,
        help=f"this process: 0 .. num_processes - 1 (env {ENV_PROCESS_ID})",
    )
    group.add_argument("--local_device_ids", default=None, metavar="I,J,...",
                       help=f"restrict this process to these local devices "
                       f"(env {ENV_LOCAL_DEVICE_IDS})")  # fmt: skip


def from_args(args: argparse.Namespace) -> bool:
    """initialize() from parsed add_arguments() flags (the environment fills what is missing)."""
    return initialize(
        coordinator_address=getattr(args, "coordinator", None),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
        local_device_ids=getattr(args, "local_device_ids", None),
    )
