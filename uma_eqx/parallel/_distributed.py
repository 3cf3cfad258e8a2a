"""Several processes (hosts): `jax.distributed` start-up."""

import os
from collections.abc import Sequence

import jax

#: Environment variables read when `num_processes` / `process_id` are not given (JAX itself
#: reads `JAX_COORDINATOR_ADDRESS` and `JAX_LOCAL_DEVICE_IDS`, but has no variables for these two).
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
#: JAX's own variable for the coordinator (`jax/_src/distributed.py`).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
#: Cross-process collectives for CPU devices (`jax_cpu_collectives_implementation`; JAX's
#: default since 0.5, set explicitly so that an older default, none, cannot silently apply).
CPU_COLLECTIVES = "gloo"

_started: dict | None = None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer; set it to an int or unset it.") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> tuple[int, int]:
    """Start `jax.distributed` so that `jax.devices()` spans every process.

    Call it first thing in every process, before anything touches JAX's devices. Then meshes
    over `jax.devices()` cover all hosts: `uma_eqx.predict(..., devices=jax.devices())` splits
    each batch over every process's devices (data parallel), and the graph-parallel engines
    split one structure over them. CPU devices exchange data with gloo.

    Two ways to say where the processes are:

    - explicitly: `coordinator_address` (`"host:port"` of process 0, reachable by all),
        `num_processes` and `process_id` (this process, `0 .. num_processes - 1`); each may
        also come from `$JAX_COORDINATOR_ADDRESS`, `$JAX_NUM_PROCESSES`, `$JAX_PROCESS_ID`;
    - detected: with none of the three set, JAX reads them from the cluster environment
        itself (SLURM: `srun`'s `SLURM_*` variables, one process per task with
        `SLURM_LOCALID` as its local device; Open MPI: `mpirun`'s `OMPI_MCA_orte_hnp_uri`;
        also Kubernetes and Cloud TPU).

    Idempotent: a second call with no arguments or the same ones returns the same answer.

    **Arguments:**

    - `coordinator_address`, `num_processes`, `process_id`: as above; all three or none.
    - `local_device_ids`: this process's devices (e.g. `[0]`), default all it sees (or
        `$JAX_LOCAL_DEVICE_IDS`).

    **Returns:**

    `(process_index, process_count)`.

    **Raises:**

    `ValueError` when only some of the three are given (naming the missing ones), when no
    cluster is detected, or on a call with arguments different from the first one's;
    `RuntimeError` when JAX's devices were already in use.
    """
    global _started
    requested = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": local_device_ids,
    }
    if _started is not None or jax.distributed.is_initialized():
        given = {k: v for k, v in requested.items() if v is not None}
        first = _started or {}
        clash = {k: v for k, v in given.items() if first.get(k) != v}
        if clash:
            raise ValueError(
                f"uma_eqx.parallel.initialize was already called with {first}; it cannot be started again "
                f"with {clash}. Call it once per process (or again with no arguments)."
            )
        return jax.process_index(), jax.process_count()
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
    num_processes = num_processes if num_processes is not None else _env_int(NUM_PROCESSES_ENV)
    process_id = process_id if process_id is not None else _env_int(PROCESS_ID_ENV)
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    missing = [k for k, v in explicit.items() if v is None]
    if 0 < len(missing) < len(explicit):
        given = {k: v for k, v in explicit.items() if v is not None}
        raise ValueError(
            f"uma_eqx.parallel.initialize got {given} but not {missing}: give all of coordinator_address, "
            "num_processes and process_id (arguments or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, "
            "$JAX_PROCESS_ID), or none of them to detect SLURM / Open MPI."
        )
    if not missing:
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes={num_processes!r} must be a positive int.")
        if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id!r} must be an int in 0..{num_processes - 1}.")
    from jax._src import xla_bridge  # the check jax.distributed.initialize makes, said before touching anything

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "uma_eqx.parallel.initialize must run before anything uses JAX's devices (jax.devices(), a "
            "computation, loading a model, ...): call it first thing in every process."
        )
    jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    except ValueError as e:
        if missing:
            raise ValueError(
                f"uma_eqx.parallel.initialize: no cluster detected ({e}); run under srun (SLURM) or mpirun "
                "(Open MPI), or give coordinator_address, num_processes and process_id."
            ) from None
        raise
    _started = dict(requested)
    return jax.process_index(), jax.process_count()
