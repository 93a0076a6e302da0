"""Multi-process start-up: `jax.distributed` from flags or the environment, and the mesh from `--mesh`.

Every process runs the same program. After `initialize`, `jax.devices()` lists the devices of all
processes, so a `sharding.make_mesh` mesh spans the hosts and the same `generate(..., mesh=mesh)` call
runs on each of them; only `is_main_process()` should print or write results.

Sources, first found wins: explicit arguments (the CLI flags), then MISTRAL_JAX_COORDINATOR /
MISTRAL_JAX_NUM_PROCESSES / MISTRAL_JAX_PROCESS_ID, then a TPU pod's own environment (jax finds the
coordinator itself). Nothing found, or a single process: nothing to do.
"""

from __future__ import annotations

import argparse
import os

import jax

from mistral_jax import sharding
from mistral_jax.errors import UserError

ENV_COORDINATOR = "MISTRAL_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MISTRAL_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MISTRAL_JAX_PROCESS_ID"
# Set by Cloud TPU VMs; with several worker hostnames the VM is one host of a pod slice.
_TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


def _on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or any(
        os.environ.get(name) for name in _TPU_POD_ENV[1:]
    )


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start `jax.distributed` when this is one process of several; returns whether it is.

    Must run before anything else touches jax's devices. Safe to call twice.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if jax.distributed.is_initialized():
        return True
    if coordinator is None and num_processes is None and process_id is None:
        if _on_tpu_pod():
            jax.distributed.initialize()  # the TPU runtime knows the coordinator and the process ids
            return True
        return False
    if num_processes is not None and num_processes < 1:
        raise UserError(f"the number of processes must be positive, got {num_processes}")
    if num_processes == 1 and process_id in (None, 0):
        return False  # a single process: nothing to coordinate
    missing = [flag for flag, value in (("--coordinator", coordinator), ("--num-processes", num_processes),
                                        ("--process-id", process_id)) if value is None]
    if missing:
        raise UserError(
            f"a multi-process run needs the coordinator, the number of processes and this process's id; missing "
            f"{', '.join(missing)} (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})"
        )
    if not 0 <= process_id < num_processes:
        raise UserError(f"process id {process_id} is outside [0, {num_processes})")
    if ":" not in coordinator:
        raise UserError(f"the coordinator must be HOST:PORT, got {coordinator!r}")
    # CPU devices of different processes talk through gloo (only the CPU backend reads this option).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def add_distributed_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--mesh, --coordinator, --num-processes, --process-id (see `setup`)."""
    group = parser.add_argument_group("devices and hosts")
    group.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                       help="split the model over a device mesh, e.g. data=1,fsdp=2,expert=2,tensor=2 (axes "
                            f"{', '.join(sharding.MESH_AXES)}; fsdp fills the devices left)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help=f"multi-host: address of process 0's coordinator (or ${ENV_COORDINATOR})")
    group.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help=f"multi-host: number of processes (or ${ENV_NUM_PROCESSES})")
    group.add_argument("--process-id", type=int, default=None, metavar="I",
                       help=f"multi-host: this process's index, 0 to N-1 (or ${ENV_PROCESS_ID})")
    return parser


def setup(args: argparse.Namespace):
    """Start jax.distributed if asked, and return the mesh to run on, or None for a plain single device.

    A multi-process run without --mesh gets every device on the fsdp axis: without a mesh nothing
    would span the hosts.
    """
    distributed = initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                             getattr(args, "process_id", None))
    text = getattr(args, "mesh", None)
    if text:
        return sharding.make_mesh(**sharding.parse_mesh(text))
    if distributed and jax.process_count() > 1:
        return sharding.make_mesh()
    return None


def is_main_process() -> bool:
    """Process 0: the one that prints and writes files."""
    return jax.process_index() == 0
