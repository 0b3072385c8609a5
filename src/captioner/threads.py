"""How many threads torch computes with on a CPU: the cores other processes leave free.

torch's CPU threads wait for each other at the end of every operation. When another process holds
a core, the thread sharing it is descheduled and every operation waits for it. On the 2-core Zen 4
with one other busy process, 46 photos took 1.21-1.26 s on torch's default of two threads against
0.69-0.74 s on one, and a training epoch 5.5-6.4 s against 2.9-3.3 s; idle, two threads are the
faster (0.45-0.47 s against 0.72 s, and 1.8-2.0 s against 3.1 s). OpenMP's passive waiting
(OMP_WAIT_POLICY=PASSIVE) avoids most of the collapse but costs a fifth of the idle speed
(docs/EXPERIMENTS.md, "Threads").

So by default captioner measures how many cores the other processes keep busy (from /proc/stat,
less its own CPU time and its children's) and uses the rest, at least one thread and at most
torch's own default. It measures from when it started to when the model is ready (no waiting of
its own), and long-lived work (the server, training, captioning a folder) looks again at most
every REFRESH_SECONDS. `--threads N` or CAPTIONER_THREADS=N fixes the number; OMP_NUM_THREADS,
which torch reads itself, is left as the user set it. Where /proc/stat is missing (not Linux),
torch's default stands. No torch import here: the command line starts this clock before it
imports torch.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from captioner.errors import ConfigError

REFRESH_SECONDS = 10.0  # a long-lived process looks again at most this often
SHORTEST_LOOK = 0.2  # seconds: shorter, and /proc/stat's 10 ms ticks say too little
FREE_BELOW = 0.25  # cores: a process using this much of a core or less leaves it free


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the name: state, ppid, ...) of every process there
    (none where /proc is missing)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name, in brackets, may hold spaces
        except OSError:  # ended while we looked
            continue
        yield int(stat.parent.name), fields


def _children_seconds(ticks: int) -> float:
    """CPU seconds of this process's living children (loader processes work for it, not against it)."""
    me = str(os.getpid())
    return sum(int(f[11]) + int(f[12]) for _, f in process_stats() if f[1] == me) / ticks  # utime, stime


def _look() -> tuple[float, float, float] | None:
    """(now, CPU seconds the whole machine has been busy, CPU seconds of this process and its
    children); None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    busy = sum(values) - values[3] - values[4]
    own = os.times()
    return time.monotonic(), busy / ticks, own.user + own.system + _children_seconds(ticks)


class _Watch:
    """The machine's and this process's CPU time at the last look."""

    def __init__(self):
        self.last = _look()

    def others(self) -> float | None:
        """Cores the other processes kept busy since the last look (which this one becomes), or None
        when that cannot be told (no /proc/stat, or too short a time since)."""
        now = _look()
        if now is None or self.last is None or now[0] - self.last[0] < SHORTEST_LOOK:
            return None
        seconds = now[0] - self.last[0]
        others = ((now[1] - self.last[1]) - (now[2] - self.last[2])) / seconds
        self.last = now
        return max(0.0, others)


_watch = _Watch()  # the clock starts when captioner is imported
_looked = -math.inf  # when the last look was
_chosen: int | None = None  # the number of threads the last look chose
_applied = threading.local()  # what this thread was set to: torch's setting is partly per thread
_default: int | None = None  # torch's own number of threads, before any change


def requested() -> int | None:
    """The number of threads the user fixed (--threads, CAPTIONER_THREADS), None for 'auto'."""
    value = os.environ.get("CAPTIONER_THREADS", "auto").strip().lower()
    if value in ("", "auto", "0"):
        return None
    if not value.isdigit():
        raise ConfigError(f"CAPTIONER_THREADS must be a whole number of threads or 'auto', not {value!r}")
    return int(value)


def fit_threads(force: bool = False) -> int:
    """Set torch's number of CPU threads in the calling thread by the policy above (looking at the
    machine again with `force`, else at most once every REFRESH_SECONDS) and return it. torch keeps
    OpenMP's and MKL's counts per thread, so the thread that computes (the server's batcher) calls
    this itself."""
    global _looked, _chosen, _default
    import torch

    if _default is None:
        _default = torch.get_num_threads()
    fixed = requested()
    if fixed is None and ("OMP_NUM_THREADS" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return torch.get_num_threads()  # the user's own setting, or one of several processes (distributed.py)
    if force or time.monotonic() - _looked >= REFRESH_SECONDS:
        _looked = time.monotonic()
        if fixed is not None:
            _chosen = fixed
        else:
            others = _watch.others()
            if others is not None:
                _chosen = max(1, min(_default, _usable_cores() - math.ceil(others - FREE_BELOW)))
    if _chosen is not None and getattr(_applied, "threads", None) != _chosen:
        torch.set_num_threads(_chosen)
        _applied.threads = _chosen
    return torch.get_num_threads()
