"""Multi-process runs on JAX's distributed runtime (DESIGN.md §2: data parallel over every device).

    from jaxprune import distributed
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # explicit
    distributed.initialize()          # auto: only inside a detected cluster (Slurm, TPU pod, Open MPI)
    if distributed.is_main(): ...     # files are written by process 0 only
    distributed.barrier("ckpt")       # every process waits here until all arrive
    x = distributed.broadcast_json(x) # process 0's x (JSON data) on every process

Each process reads its own shard of every global batch (`data.loader(...,
process_index, process_count)`), `data.to_global` assembles the shards into
global arrays, and the compiled step runs over the mesh of all processes'
devices. Parameters are replicated, so every process holds the same model and
computes the same results; only process 0 writes the run folder (config,
metrics, report, export; checkpoints are orbax's collective writes, to which the
others add their shards' metadata), and the others wait at a barrier where
they read back what it wrote.

`initialize` must run before anything touches a JAX device; a plain laptop run
(no flags, no cluster) does nothing and never waits for a coordinator.
"""
from __future__ import annotations

import os

from jaxprune.errors import UserError


def cluster_environment() -> str | None:
    """The multi-process launcher this process runs under, or None. A one-task Slurm step is
    an ordinary run; a TPU VM always joins its slice (jax finds its hosts)."""
    env = os.environ
    # inside an srun step of several tasks (a batch script's own shell has no step node list
    # and is one process, whatever the job's task count)
    if ("SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env
            and _count(env.get("SLURM_NTASKS")) > 1):
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if (len([h for h in hosts.split(",") if h.strip()]) > 1
            or "MEGASCALE_COORDINATOR_ADDRESS" in env or _tpu_chips() > 0):
        # on a Cloud TPU VM jax reads the slice's hosts from the metadata server; a
        # one-host slice initializes as one process
        return "tpu pod"
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "open mpi"
    return None


def _tpu_chips() -> int:
    """TPU chips on this host's PCI bus: the local check jax itself runs before it asks a
    Cloud TPU VM's metadata server for the slice (jax-internal, hence the guard)."""
    try:
        from jax._src import hardware_utils
        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except (ImportError, AttributeError, OSError, TypeError):
        return 0


def _count(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _parse_coordinator(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:1234), got {address!r}")
    return address


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str | None:
    """Join (or start, as process 0) a multi-process run; returns how, or None for one process.

    With `coordinator`, `num_processes` and `process_id` all given: that run. With none
    of them: `jax.distributed.initialize()` reads them from the cluster environment, and is
    only called when `cluster_environment()` finds one. Anything in between is a UserError."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise UserError("--coordinator, --num-processes and --process-id go together: give all "
                        "three (every process the same coordinator and count, its own id), or none "
                        "to detect a Slurm / TPU pod / Open MPI launch")
    import jax
    if all(given):
        _parse_coordinator(coordinator)
        if num_processes < 1:
            raise UserError(f"--num-processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
        if num_processes == 1:
            return None
        # CPU processes exchange their collectives over gloo (TCP); the default may change
        # between JAX versions, a multi-process CPU run needs it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return f"process {process_id} of {num_processes} (coordinator {coordinator})"
    found = cluster_environment()
    if found is None:
        return None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()
    return f"process {jax.process_index()} of {jax.process_count()} ({found})"


def is_main() -> bool:
    """True on the process that writes files (process 0; the only one of a 1-process run)."""
    import jax
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op for one process): e.g.
    after process 0 wrote a file the others are about to read. `name` must be the same
    string on every process at the same point."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def broadcast_json(obj):
    """Process 0's `obj` (JSON-serialisable data) on every process, exactly (sent as its
    JSON text); the others' `obj` is ignored. For one process, `obj` as is. Every process
    must call it at the same point. E.g. a latency table only process 0 measured."""
    import jax
    if jax.process_count() == 1:
        return obj
    import json

    import numpy as np
    from jax.experimental import multihost_utils
    raw = json.dumps(obj).encode() if is_main() else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(raw))))
    text = np.frombuffer(raw, np.uint8) if is_main() else np.zeros(n, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(text)).tobytes())
