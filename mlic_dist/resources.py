"""How many CPU cores a process may use: one count for every thread pool the package sizes (the
loaders' decode threads, torch's intra-op threads on CPU, the metrics' sort threads).

    usable_cores()        the cores this process may run on (its affinity mask: a container's or
                          a scheduler's share, not the machine's count)
    cores_per_process()   that, divided among the processes of this node (LOCAL_WORLD_SIZE, set
                          by torchrun / accelerate launch / Ray Train)
"""
from __future__ import annotations

import os
from typing import Optional


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cores_per_process(local_processes: Optional[int] = None) -> int:
    """This process's share of the usable cores among `local_processes` processes on the node
    (default: $LOCAL_WORLD_SIZE, else 1); at least 1."""
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, usable_cores() // max(1, local_processes))
