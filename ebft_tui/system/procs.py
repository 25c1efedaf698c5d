"""CPU% and RSS of a process group (a child and everything it spawned), with psutil.

The `psutil.Process` objects are kept between samples because the first `cpu_percent(None)` of a
process is a meaningless 0.0; a process seen once keeps being counted after its parent died
(vLLM's EngineCore outlives its API server when that is SIGKILLed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil


@dataclass
class GroupSample:
    cpu_percent: float = 0.0
    rss_mb: float = 0.0
    n_procs: int = 0
    pids: list[int] = field(default_factory=list)


class GroupSampler:
    def __init__(self, pid: int):
        self.pid = pid
        self._procs: dict[int, psutil.Process] = {}

    def _discover(self) -> None:
        try:
            leader = psutil.Process(self.pid)
            found = [leader, *leader.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            found = []
        for p in found:
            if p.pid not in self._procs:
                try:
                    p.cpu_percent(None)  # prime
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self._procs[p.pid] = p

    def sample(self) -> GroupSample:
        self._discover()
        out = GroupSample()
        for pid, p in list(self._procs.items()):
            try:
                if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(pid)
                with p.oneshot():
                    out.cpu_percent += p.cpu_percent(None)
                    out.rss_mb += p.memory_info().rss / 2**20
                out.n_procs += 1
                out.pids.append(pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self._procs.pop(pid, None)
        return out
