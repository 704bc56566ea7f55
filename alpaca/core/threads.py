"""How many CPU threads torch uses for training and generation.

torch picks its own default (the machine's physical cores), which goes wrong in two common places:
a container whose CPU quota is smaller than the machine (each thread then waits for the quota), and
several processes on one machine (torchrun ranks, or a demo next to a training run), which then
oversubscribe the cores. Measured on a 2-core machine (docs/performance.md): on a quiet machine 2
threads generated 1.3-1.5x faster than 1, while other work on the machine made 2 threads train up to
3.4x slower than 1.
So the rule is: an explicit --num_threads wins, then OMP_NUM_THREADS (the usual knob, which torchrun
sets to 1 per rank), else the cores this process may use, shared among the local ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

# Small models stop scaling well before this; more threads mostly add synchronisation.
MAX_DEFAULT_THREADS = 32


def usable_cores() -> int:
    """Physical cores this process may run on: the affinity mask, less SMT siblings, within the
    cgroup CPU quota (containers)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        logical = os.cpu_count() or 1
    siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    per_core = 1
    try:
        per_core = max(1, len(_parse_cpu_list(siblings.read_text())))
    except (OSError, ValueError):
        pass
    cores = max(1, logical // per_core)
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else cores


def _parse_cpu_list(text: str) -> list[int]:
    """`0,4` or `0-1` (Linux's cpu list format) -> the cpu ids."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            first, last = part.split("-")
            cpus.extend(range(int(first), int(last) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")):
    """Whole CPUs allowed by the cgroup CPU quota, rounded up; None without a quota.

    cgroup v2: `cpu.max` ("max 100000" is no limit). cgroup v1 (still common in containers and CI
    runners): `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 is no limit) in the cpu controller's folder
    for this process (`/proc/self/cgroup`), or at the controller's root where a container mounts its own.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    relative = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                relative = path.lstrip("/")
    except (OSError, ValueError):
        pass
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for folder in dict.fromkeys((root / controller / relative, root / controller)):
            try:
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                period = int((folder / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            return None if quota <= 0 or period <= 0 else max(1, -(-quota // period))
    return None


def choose_num_threads(num_threads: int = 0) -> tuple[int, str]:
    """The number of torch threads to use and why (for the start-up log)."""
    if num_threads < 0:
        raise ValueError(f"--num_threads must be 0 (choose) or a positive count, got {num_threads}")
    if num_threads:
        return num_threads, "--num_threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"OMP_NUM_THREADS={env!r} is not a positive integer: unset it or fix it")
        return int(env), "OMP_NUM_THREADS"
    cores = usable_cores()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    count = max(1, min(MAX_DEFAULT_THREADS, cores // max(1, ranks)))
    shared = f", shared by {ranks} local ranks" if ranks > 1 else ""
    return count, f"{cores} usable physical core(s){shared}"


def set_num_threads(num_threads: int = 0, log=print) -> int:
    """Choose the thread count (see `choose_num_threads`), give it to torch, log it; return it."""
    import torch

    count, why = choose_num_threads(num_threads)
    torch.set_num_threads(count)
    log(f"torch threads: {count} ({why})")
    return count
