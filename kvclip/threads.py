"""CPU thread defaults for serving: as many compute threads as the CPU quota, waiting passively.

A container sees every core of its host in os.cpu_count(), and torch starts one OpenMP
thread per core; under a Kubernetes CPU limit those threads are throttled. OpenMP's default
wait policy also spins threads at every barrier, which steals the cores that decoding, the
event loop and the next request need (measured: kvclip at 0.77x of the raw encoder with the
defaults, 0.9x+ with OMP_WAIT_POLICY=PASSIVE). These must be set before torch is imported;
a value the user set is never overridden. Standard library only.
"""
from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit of this process's cgroup in cores (v2 cpu.max or v1 CFS quota), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def cpu_quota(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: the CPUs it may run on, capped by its cgroup's limit."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, math.floor(limit))  # a 1.5-core limit runs 1 thread without throttling
    return max(1, cores)


def cpu_thread_defaults(environ: MutableMapping[str, str] = os.environ, root: Path = CGROUP_ROOT) -> dict[str, str]:
    """Set OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS=<quota> unless already set; returns what was set."""
    wanted = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(cpu_quota(root))}
    applied = {name: value for name, value in wanted.items() if name not in environ}
    environ.update(applied)
    return applied
