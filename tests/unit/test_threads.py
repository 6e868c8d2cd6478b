"""CPU thread defaults for kvclip serve: the cgroup quota, passive OpenMP waits, never overriding the user."""
from __future__ import annotations

import os

import pytest

from kvclip.threads import cgroup_cpu_limit, cpu_quota, cpu_thread_defaults


def cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    return tmp_path


@pytest.mark.parametrize("v2, v1, expected", [
    ("200000 100000", None, 2.0),       # cgroup v2: 2 cores
    ("150000 100000", None, 1.5),
    ("max 100000", None, None),         # no limit
    (None, ("50000", "100000"), 0.5),   # cgroup v1
    (None, ("-1", "100000"), None),     # v1 without a limit
    (None, None, None),                 # no cgroup files at all
])
def test_cgroup_limits_are_read(tmp_path, v2, v1, expected):
    assert cgroup_cpu_limit(cgroup(tmp_path, v2, v1)) == expected


def test_the_quota_caps_the_cpus_we_may_run_on(tmp_path):
    cores = len(os.sched_getaffinity(0))
    limits = {"none": None, "one": "100000 100000", "half": "50000 100000", "plenty": f"{(cores + 8) * 100000} 100000"}
    folders = {name: tmp_path / name for name in limits}
    for name, folder in folders.items():
        folder.mkdir()
        cgroup(folder, limits[name])
    assert cpu_quota(folders["none"]) == cores
    assert cpu_quota(folders["one"]) == 1
    assert cpu_quota(folders["half"]) == 1  # never fewer than one thread
    assert cpu_quota(folders["plenty"]) == cores  # a limit above the CPUs we may run on changes nothing


def test_defaults_are_set_only_where_the_user_set_nothing(tmp_path):
    root = cgroup(tmp_path, "100000 100000")
    env: dict[str, str] = {}
    assert cpu_thread_defaults(env, root) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    mine = {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    assert cpu_thread_defaults(mine, root) == {} and mine == {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
