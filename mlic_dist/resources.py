"""How many CPU cores a process may use: one count for every thread pool the package sizes (the
loaders' decode threads, torch's intra-op threads on CPU, the metrics' sort threads).

    usable_cores()        the cores this process may run on (its affinity mask: a container's or
                          a scheduler's share, not the machine's count)
    cores_per_process()   this process's share: the CPUs a scheduler assigned it
                          ($MLIC_CPUS_PER_PROCESS, which the sweep's Ray Train workers set from
                          what Ray reserved for them), else the usable cores divided among the
                          processes of this node ($LOCAL_WORLD_SIZE, set by torchrun / accelerate
                          launch)

Under Ray, LOCAL_WORLD_SIZE counts only one trial's workers on a node and the affinity mask is
the whole machine, so without the assigned share 4 co-located trials x 2 workers on an 8-GPU
node would each start cores / 2 threads (docs/sweeps.md).
"""
from __future__ import annotations

import math
import os
from typing import Optional

ASSIGNED_CPUS_ENV = "MLIC_CPUS_PER_PROCESS"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def assigned_cpus() -> Optional[int]:
    """The CPUs a scheduler reserved for this process ($MLIC_CPUS_PER_PROCESS), or None."""
    value = os.environ.get(ASSIGNED_CPUS_ENV)
    if not value:
        return None
    try:
        return max(1, math.floor(float(value)))
    except ValueError:
        raise ValueError(f"{ASSIGNED_CPUS_ENV}={value!r} must be a number of CPUs") from None


def cores_per_process(local_processes: Optional[int] = None) -> int:
    """This process's share of the cores: what a scheduler assigned it, else the usable cores
    among `local_processes` processes on the node (default: $LOCAL_WORLD_SIZE, else 1); >= 1."""
    assigned = assigned_cpus()
    if assigned is not None:
        return min(assigned, usable_cores())
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, usable_cores() // max(1, local_processes))
