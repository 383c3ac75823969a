"""CPU threads chosen so that a run sharing the machine degrades gracefully and a run alone
loses nothing.

A team of N OpenMP threads on cores that other processes are using waits, at every barrier, for
its slowest member to be scheduled; worse, GNU OpenMP (libgomp, which PyTorch uses on Linux)
lets a waiting thread spin for about 300,000 iterations (7 ms on a current x86 core) before it
sleeps, holding the core its team-mate needs. Next to one other busy process, a small network's
training step ran at 0.07-0.3x its idle speed (``benchmarks/cpu_shared.py``). Fewer threads, one
per core the others leave free, remove the collapse. Shortening the spin instead
(``OMP_WAIT_POLICY=PASSIVE``, or ``GOMP_SPINCOUNT`` of 1,000-3,000) also helps when shared, but
capped the idle speed of small networks at about half, so the wait policy is left alone.

* At start-up, :func:`configure` (called by the command line first thing, and by
  ``run_pipeline``; an API user calls ``noisystudent.configure_cpu()`` before importing torch)
  watches for :data:`SAMPLE_SECONDS` how many of the usable cores (CPU affinity, and a
  container's cgroup CPU quota) other processes keep busy, and when they keep at least
  :data:`BUSY_THRESHOLD` of a core busy sets ``OMP_NUM_THREADS`` to what they leave free.
* While training, :class:`ThreadGovernor` looks again every :data:`RECHECK_SECONDS` and moves the
  thread count between that and PyTorch's default, so a run keeps up with processes that start
  or stop after it did.

On an idle machine neither changes anything. The user always wins: an ``OMP_NUM_THREADS`` in the
environment, or a ``torch.set_num_threads`` call, turns both off, as does
``NOISYSTUDENT_CPU_TUNING=0``. If torch was imported before :func:`configure` ran, it sets nothing
(it would come too late) and the governor stays off. Importing noisystudent changes nothing:
configuring is an explicit call, made once per process (later calls return the first decision).
Child processes inherit ``OMP_NUM_THREADS``; one that calls :func:`configure` chooses again.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, MutableMapping

__all__ = ["configure", "cpu_settings", "cpu_description", "choose_threads", "usable_cores", "others_busy_cores",
           "ThreadGovernor", "OFF_VARIABLE"]

OFF_VARIABLE = "NOISYSTUDENT_CPU_TUNING"
# OMP_NUM_THREADS holding this variable's value was set by configure(), not by the user.
OURS_VARIABLE = "NOISYSTUDENT_OMP_NUM_THREADS"
SAMPLE_SECONDS = 0.1  # how long start-up watches the other processes' CPU use
BUSY_THRESHOLD = 0.5  # others keeping less than half a core busy leave the default alone
RECHECK_SECONDS = 5.0  # how often a training run looks at the others again
WAIT_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # reported, never set

log = logging.getLogger("noisystudent")
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


class _Sample:
    """CPU time of the usable cores and of this process at one moment."""

    def __init__(self, cpus: list[int]):
        self.cpus, self.machine, self.own = cpus, _read_cpu_times(cpus), os.times()

    def others_since(self, earlier: "_Sample") -> float | None:
        """Cores other processes kept busy between ``earlier`` and this sample."""
        if self.machine is None or earlier.machine is None or self.machine[1] <= earlier.machine[1]:
            return None
        busy = (self.machine[0] - earlier.machine[0]) / (self.machine[1] - earlier.machine[1]) * len(self.cpus)
        elapsed = self.own.elapsed - earlier.own.elapsed
        own = self.own.user + self.own.system - earlier.own.user - earlier.own.system
        return max(0.0, busy - (own / elapsed if elapsed > 0 else 0.0))


def others_busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Cores (of those this process may use) kept busy by other processes during the next
    ``seconds``; None where /proc/stat cannot be read."""
    first = _Sample(_affinity())
    if first.machine is None:
        return None
    time.sleep(seconds)
    return _Sample(first.cpus).others_since(first)


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


def _threads_for(cores: dict, others: float | None) -> int:
    """Threads for ``others`` busy cores: what they leave free (rounded, at least one), never more
    than PyTorch's default (the physical cores) nor the cgroup quota."""
    free = float(cores["cpus"]) if cores["quota"] is None else min(cores["cpus"], cores["quota"])
    threads = min(cores["physical"], max(1, math.floor(free + 0.5)))
    if others is not None and others >= BUSY_THRESHOLD:
        threads = min(threads, max(1, math.floor(free - others + 0.5)))
    return threads


def choose_threads(busy: Callable[[], float | None] = others_busy_cores,
                   cores: dict | None = None) -> tuple[int | None, dict]:
    """The intra-op thread count to start with: ``(threads, info)``. ``threads`` is None when
    PyTorch's default (the physical cores) is right: no cgroup quota below it and other processes
    keeping less than :data:`BUSY_THRESHOLD` of a core busy."""
    cores = usable_cores() if cores is None else cores
    others = busy()
    threads = _threads_for(cores, others)
    info = dict(cores, others_busy_cores=None if others is None else round(others, 2), threads=threads)
    return (None if threads == cores["physical"] else threads), info


def configure(environ: MutableMapping[str, str] | None = None,
              busy: Callable[[], float | None] = others_busy_cores, cores: dict | None = None) -> dict:
    """Choose this process's thread count, unless the user did (``OMP_NUM_THREADS``).

    Returns what was decided (kept for :func:`cpu_settings` and :class:`ThreadGovernor`): ``set``
    (variables this call set), ``kept`` (the user's own, untouched), ``threads`` (the choice and
    what it was based on), ``governed`` (whether the thread count is ours to change later) and
    ``note`` (why nothing was decided). ``environ``, ``busy`` and ``cores`` are for tests.

    For this process (``environ`` None) it decides once: a second call (the CLI, then
    ``run_pipeline``) returns the first decision without sampling again.
    """
    if environ is None and _applied:
        return dict(_applied)
    env = os.environ if environ is None else environ
    user_threads = "OMP_NUM_THREADS" in env and env.get(OURS_VARIABLE) != env["OMP_NUM_THREADS"]
    kept = {k: env[k] for k in WAIT_KNOBS if k in env} | ({"OMP_NUM_THREADS": env["OMP_NUM_THREADS"]}
                                                          if user_threads else {})
    decided: dict = {"set": {}, "kept": kept, "threads": {}, "governed": False, "note": ""}
    if env.get(OFF_VARIABLE, "").strip().lower() in ("0", "off", "false", "no"):
        decided["note"] = f"{OFF_VARIABLE}={env[OFF_VARIABLE]}: CPU thread choice disabled"
    elif environ is None and "torch" in sys.modules:
        decided["note"] = "torch was imported before configure(): its OpenMP settings are already fixed"
    elif user_threads:
        decided["note"] = "OMP_NUM_THREADS is set in the environment"
    else:
        threads, decided["threads"] = choose_threads(busy, cores)
        decided["governed"] = True
        if threads is None:
            env.pop("OMP_NUM_THREADS", None)  # inherited from a parent that chose for itself
            env.pop(OURS_VARIABLE, None)
        else:
            env["OMP_NUM_THREADS"] = env[OURS_VARIABLE] = decided["set"]["OMP_NUM_THREADS"] = str(threads)
    if environ is None:
        _applied.clear()
        _applied.update(decided)
    return decided


class ThreadGovernor:
    """Keeps a long CPU loop's thread count matched to what other processes leave free.

    Call :meth:`tick` once per step; every :data:`RECHECK_SECONDS` it measures the other
    processes' CPU use since the last look (no waiting: the loop's own time is the window) and
    calls ``torch.set_num_threads`` when the right count has changed. Active only where start-up
    chose the thread count (:func:`configure`) and nobody has called ``torch.set_num_threads``
    since; otherwise ``tick`` does nothing. The schedule and the count live in ``decided`` (the
    process's start-up decision), so consecutive stages continue where the last one stopped.
    ``changes`` lists what this governor did.
    """

    def __init__(self, desc: str = "", recheck: float = RECHECK_SECONDS, decided: dict | None = None):
        import torch

        self.decided = _applied if decided is None else decided
        self.desc, self.recheck, self.changes = desc, recheck, []
        self.cores, expected = None, None
        if self.decided.get("governed"):
            self.cores = self.decided.setdefault("cores", usable_cores())
            expected = self.decided.get("current",
                                        int(self.decided["set"].get("OMP_NUM_THREADS", self.cores["physical"])))
        # Any other count means the user set the threads in code (a test, a benchmark): theirs.
        self.active = expected is not None and torch.get_num_threads() == expected
        if self.active and "last" not in self.decided:
            self.decided.update(current=expected, last=_Sample(_affinity()), next=time.monotonic() + recheck)

    def tick(self) -> None:
        """Look again if it is time; change the thread count if the others' use has changed."""
        d = self.decided
        if not self.active or time.monotonic() < d["next"]:
            return
        import torch

        now = _Sample(d["last"].cpus)
        others = now.others_since(d["last"])
        d["last"], d["next"] = now, time.monotonic() + self.recheck
        current = torch.get_num_threads()
        if current != d["current"]:  # changed by someone else meanwhile: theirs from now on
            self.active = d["governed"] = False
            return
        threads = _threads_for(self.cores, others)
        if others is not None and threads != current:
            torch.set_num_threads(threads)
            d["current"] = threads
            self.changes.append({"threads": threads, "others_busy_cores": round(others, 2)})
            log.info(f"[{self.desc}] CPU threads {current} -> {threads} (other processes kept "
                     f"{others:.1f} of {self.cores['cpus']} cores busy)")


def cpu_settings() -> dict:
    """The CPU settings in force, for logs, summaries and benchmark output: intra-op threads, the
    OpenMP variables in the environment and what :func:`configure` decided at start-up."""
    import torch

    return {"threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in (*WAIT_KNOBS, "OMP_NUM_THREADS") if k in os.environ},
            "configured": {k: v for k, v in _applied.items() if k in ("set", "kept", "threads", "governed", "note")}}


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The processor, for benchmark output: its model name, usable cores, and whether it has native
    bf16 instructions (``avx512_bf16`` or ``amx_bf16``; without them bf16 autocast on a CPU ran 7x
    slower than fp32, so the same benchmark takes far longer there). Read from ``/proc/cpuinfo``;
    ``native_bf16`` is None where that file cannot be read (not Linux)."""
    import platform

    model, flags = None, None
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and flags is None:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "arch": platform.machine(),
            "cores": usable_cores()["cpus"],
            "native_bf16": None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16"})}
