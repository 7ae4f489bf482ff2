"""How many worker processes to start when the user does not say: the cores this process may run on."""

from __future__ import annotations

import os


def default_workers(most: int) -> int:
    """One worker process per core this process may use, at most ``most`` (and at least 1).

    ``os.sched_getaffinity`` counts the cores a CPU set (taskset, a container's cpuset) leaves, which
    ``os.cpu_count`` does not; PyTorch's DataLoader warns once per worker when given more workers than that.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(most, cores))
