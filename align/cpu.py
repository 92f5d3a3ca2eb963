"""Keep torch's thread count at the number of cores other processes leave free.

On a 2-core machine shared with other jobs, two torch threads that each get half a core spend most
of their time waiting for each other at every operator's barrier: generation ran at well under half
its speed that way, while one thread on the free core kept its full speed. Two threads are
still better when the machine is otherwise idle, and other jobs come and go, so `ThreadGovernor`
re-measures every few seconds (from /proc: all CPU time minus this process's own) and switches.
"""

from __future__ import annotations

import os
import time

import torch

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _system_busy_total() -> tuple[float, float]:
    """(busy, total) CPU seconds over all cores since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / _TICKS, sum(fields) / _TICKS


def _own_busy() -> float:
    t = os.times()
    return t.user + t.system


class ThreadGovernor:
    """Call `poll()` often (cheap); every `interval_s` it sets torch's threads from the others' load."""

    def __init__(self, interval_s: float = 3.0, max_threads: int | None = None) -> None:
        self.cores = max_threads or os.cpu_count() or 1
        self.interval_s = interval_s
        self.enabled = os.path.exists("/proc/stat") and self.cores > 1
        self._last = self._sample() if self.enabled else None
        self._last_time = time.monotonic()

    def _sample(self) -> tuple[float, float, float]:
        busy, total = _system_busy_total()
        return busy, total, _own_busy()

    def others_load(self) -> float | None:
        """Cores used by other processes since the last measurement (None if too soon)."""
        now = time.monotonic()
        if not self.enabled or now - self._last_time < self.interval_s:
            return None
        sample = self._sample()
        busy0, total0, own0 = self._last
        busy1, total1, own1 = sample
        self._last, self._last_time = sample, now
        span = total1 - total0
        if span <= 0:
            return None
        return max(0.0, self.cores * ((busy1 - busy0) - (own1 - own0)) / span)

    def poll(self) -> int:
        load = self.others_load()
        threads = torch.get_num_threads()
        if load is not None:
            free = self.cores - load
            # Hysteresis: drop a thread as soon as a core is mostly taken, take it back only when clearly free.
            if threads > 1 and free < threads - 0.4:
                threads = max(1, int(free + 0.4))
            elif threads < self.cores and free > threads + 0.7:
                threads = min(self.cores, int(free + 0.3))
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return threads


_GOVERNOR: ThreadGovernor | None = None


def governor() -> ThreadGovernor:
    global _GOVERNOR
    if _GOVERNOR is None:
        _GOVERNOR = ThreadGovernor()
    return _GOVERNOR
