"""CPU threads and OpenMP waiting, chosen once at start-up so that a run sharing the machine
degrades gracefully and a run alone loses nothing.

Two things make PyTorch collapse on a busy CPU (``benchmarks/cpu_shared.py``):

* GNU OpenMP (libgomp, which PyTorch uses on Linux) lets a thread that waits for work spin for
  about 300,000 iterations (7 ms on a current x86 core) before it sleeps. Alone on the machine
  that costs nothing; next to another busy process, a spinning thread holds the core the thread
  with work needs, and a small network's step ran at 0.07-0.3x its idle speed.
  ``OMP_WAIT_POLICY=PASSIVE`` (no spin) avoids that but makes every parallel region pay a
  wake-up, which halved the idle speed of small networks. :data:`SPIN_COUNT` spins long enough
  to bridge the gaps between the operators of a step, short enough to hand a contended core
  back within a fraction of a millisecond.
* A team of N threads on cores that others are using waits, at every barrier, for its slowest
  member to be scheduled. :func:`choose_threads` measures, over :data:`SAMPLE_SECONDS`, how many
  cores other processes keep busy and starts with fewer threads when they leave less than all
  of them free (one thread on two cores that are already in use). On an idle machine it leaves
  PyTorch's default alone. Cores are those this process may use: its CPU affinity and, in a
  container, its cgroup CPU quota.

libgomp reads its environment once, when PyTorch's library loads, so :func:`configure` runs from
``noisystudent/__init__.py`` before anything imports torch, and sets ``GOMP_SPINCOUNT`` and (when
fewer threads are better) ``OMP_NUM_THREADS``. It never overrides the user: an ``OMP_NUM_THREADS``
set in the environment, any of :data:`WAIT_KNOBS`, or a later ``torch.set_num_threads`` wins, and
``NOISYSTUDENT_CPU_TUNING=0`` turns all of this off. If torch was imported before noisystudent,
nothing is set (it could not take effect). Child processes (DataLoader workers, subprocesses)
inherit the settings; a child that imports noisystudent chooses its own thread count again.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, MutableMapping

__all__ = ["configure", "cpu_settings", "choose_threads", "usable_cores", "others_busy_cores",
           "SPIN_COUNT", "WAIT_KNOBS", "OFF_VARIABLE"]

# Spin iterations before a waiting OpenMP thread sleeps: ~75 us at the ~25 ns of an x86 `pause`
# (libgomp's default is 300,000). Next to a busy process, shorter was faster (1,000: 1.0x, 3,000:
# 0.85x, 10,000: 0.6x, 300,000: 0.4x); 1,000 capped a step's best time at half the idle speed
# where 3,000 did not. Measured in docs/benchmarks.md ("CPU threads on a shared machine").
SPIN_COUNT = 3000
# Variables that express a user's choice about OpenMP waiting; if any is set, none is touched.
WAIT_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
OFF_VARIABLE = "NOISYSTUDENT_CPU_TUNING"
# OMP_NUM_THREADS holding this variable's value was set by configure(), not by the user.
OURS_VARIABLE = "NOISYSTUDENT_OMP_NUM_THREADS"
SAMPLE_SECONDS = 0.1  # how long start-up watches the other processes' CPU use
BUSY_THRESHOLD = 0.5  # others keeping less than half a core busy leave the default alone

_applied: dict = {}


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _read_cpu_times(cpus: list[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies of ``cpus`` together, from /proc/stat; None off Linux."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted, busy, total = {f"cpu{c}" for c in cpus}, 0, 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            busy, total = busy + sum(values) - values[3] - values[4], total + sum(values)
    return (busy, total) if total else None


def others_busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Cores (of those this process may use) kept busy by other processes during the next
    ``seconds``; None where /proc/stat cannot be read."""
    cpus = _affinity()
    first = _read_cpu_times(cpus)
    if first is None:
        return None
    own = os.times()
    time.sleep(seconds)
    second, own_now = _read_cpu_times(cpus), os.times()
    if second is None or second[1] <= first[1]:
        return None
    busy = (second[0] - first[0]) / (second[1] - first[1]) * len(cpus)
    elapsed = own_now.elapsed - own.elapsed
    mine = (own_now.user + own_now.system - own.user - own.system) / elapsed if elapsed > 0 else 0.0
    return max(0.0, busy - mine)


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def _physical_cores(cpus: list[int]) -> int:
    """Cores among ``cpus`` with SMT siblings counted once: PyTorch's default thread count."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("", str(cpu)))
    return len(cores) or len(cpus)


def usable_cores() -> dict:
    """The cores this process may use: ``cpus`` (its CPU affinity), ``physical`` (those with SMT
    siblings counted once, PyTorch's default thread count) and ``quota`` (a cgroup CPU limit, or
    None), which PyTorch's default does not look at."""
    cpus = _affinity()
    return {"cpus": len(cpus), "physical": _physical_cores(cpus), "quota": _cgroup_quota()}


def choose_threads(busy: Callable[[], float | None] = others_busy_cores,
                   cores: dict | None = None) -> tuple[int | None, dict]:
    """The intra-op thread count to start with: ``(threads, info)``. ``threads`` is None when
    PyTorch's default (the physical cores) is right: no cgroup quota below it and other processes
    keeping less than :data:`BUSY_THRESHOLD` of a core busy. Otherwise it is what they leave
    free (rounded, at least one, never more than the default)."""
    cores = usable_cores() if cores is None else cores
    default = cores["physical"]
    free = float(cores["cpus"]) if cores["quota"] is None else min(cores["cpus"], cores["quota"])
    threads = min(default, max(1, math.floor(free + 0.5)))
    others = busy()
    if others is not None and others >= BUSY_THRESHOLD:
        threads = min(threads, max(1, math.floor(free - others + 0.5)))
    info = dict(cores, others_busy_cores=None if others is None else round(others, 2), threads=threads)
    return (None if threads == default else threads), info


def configure(environ: MutableMapping[str, str] | None = None,
              busy: Callable[[], float | None] = others_busy_cores, cores: dict | None = None) -> dict:
    """Choose the OpenMP wait policy and thread count for this process, unless the user did.

    Returns what was decided (kept for :func:`cpu_settings`): ``set`` (variables this call set),
    ``kept`` (the user's own, untouched), ``threads`` (the choice and what it was based on) and
    ``note`` (why nothing was set). ``environ``, ``busy`` and ``cores`` are for tests.
    """
    env = os.environ if environ is None else environ
    user_threads = "OMP_NUM_THREADS" in env and env.get(OURS_VARIABLE) != env["OMP_NUM_THREADS"]
    kept = {k: env[k] for k in WAIT_KNOBS if k in env} | ({"OMP_NUM_THREADS": env["OMP_NUM_THREADS"]}
                                                          if user_threads else {})
    decided: dict = {"set": {}, "kept": kept, "threads": {}, "note": ""}
    if env.get(OFF_VARIABLE, "").strip().lower() in ("0", "off", "false", "no"):
        decided["note"] = f"{OFF_VARIABLE}={env[OFF_VARIABLE]}: start-up CPU settings disabled"
    elif environ is None and "torch" in sys.modules:
        decided["note"] = "torch was imported before noisystudent: its OpenMP settings are already fixed"
    else:
        if not any(k in env for k in WAIT_KNOBS):
            env["GOMP_SPINCOUNT"] = decided["set"]["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        if not user_threads:
            threads, decided["threads"] = choose_threads(busy, cores)
            if threads is None:
                env.pop("OMP_NUM_THREADS", None)  # inherited from a parent that chose for itself
                env.pop(OURS_VARIABLE, None)
            else:
                env["OMP_NUM_THREADS"] = env[OURS_VARIABLE] = decided["set"]["OMP_NUM_THREADS"] = str(threads)
    if environ is None:
        _applied.clear()
        _applied.update(decided)
    return decided


def cpu_settings() -> dict:
    """The CPU settings in force, for logs, summaries and benchmark output: intra-op threads, the
    OpenMP variables in the environment and what :func:`configure` decided at start-up."""
    import torch

    return {"threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in (*WAIT_KNOBS, "OMP_NUM_THREADS") if k in os.environ},
            "configured": dict(_applied)}
