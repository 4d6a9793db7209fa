"""The hosts of a multi-host run (`jax.distributed`): joining them, which one writes, and arrays
brought to a host whole (`to_host`) or as this host's rows (`local_rows`).

    init_distributed()          # no-op on one host; first, before anything touches a device
    if is_primary(): ...        # process 0 logs and writes shared files
    params = to_host(params)    # a collective when FSDP splits them over hosts: every host calls
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import jax
import numpy as np


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int | None = None,
    initialization_timeout_s: int | None = None,
    cluster_detection: bool = False,
) -> bool:
    """Initializes `jax.distributed` for a multi-host run; a no-op for a single process.

    Arguments left as None are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. With none of them set, nothing happens (one process) unless
    `cluster_detection` asks jax to detect a SLURM / Open MPI / TPU-pod environment. Call it
    first, before anything touches a device.

    Args:
      coordinator_address: "host:port" of process 0.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      heartbeat_timeout_s: seconds after which a silent peer counts as dead and every process
        aborts (jax's default is 100).
      initialization_timeout_s: seconds to wait for all processes to connect.
      cluster_detection: let jax detect the cluster when no address is given.
    Returns:
      True when `jax.distributed` is (now) initialized.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if address is None and not cluster_detection:
        if num_processes not in (None, 1):
            raise ValueError(
                f"num_processes={num_processes} needs a coordinator address: pass "
                "coordinator_address='host:port' or set JAX_COORDINATOR_ADDRESS"
            )
        return False
    kwargs: dict[str, Any] = {}
    accepted = inspect.signature(jax.distributed.initialize).parameters
    if heartbeat_timeout_s is not None and "heartbeat_timeout_seconds" in accepted:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_s
    if initialization_timeout_s is not None and "initialization_timeout" in accepted:
        kwargs["initialization_timeout"] = initialization_timeout_s
    jax.distributed.initialize(address, num_processes, process_id, **kwargs)
    return True


def is_primary() -> bool:
    """True on process 0: the one that logs, writes metrics files and prints progress."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Every leaf as a whole numpy array on this host: `jax.device_get`, except that arrays split
    across hosts (FSDP over several processes) are all-gathered first. With several processes it
    is a collective: every process must call it, also when only the primary writes the result.
    """
    from jax.experimental import multihost_utils

    def get(x: Any) -> Any:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(get, tree)


def local_rows(tree: Any) -> Any:
    """This process's rows of batch-sharded global arrays, as numpy, in `shard_batch`'s order: the
    inverse of `shard_batch`, so a host can compute on its own rows (a host reward on its own
    samples) and hand the result back with `shard_batch`. One process: every row. Leaves without
    a leading batch dim, or replicated ones, come back whole.
    """

    def take(x: Any) -> np.ndarray:
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.ndim == 0:
            return np.asarray(x)
        starts: dict[int, Any] = {}
        for shard in x.addressable_shards:  # a row block held by several local devices: once
            starts.setdefault(shard.index[0].start or 0, shard)
        return np.concatenate([np.asarray(starts[k].data) for k in sorted(starts)])

    return jax.tree.map(take, tree)
