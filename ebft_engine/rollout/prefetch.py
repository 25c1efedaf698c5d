"""Async structured mode: a background thread generates the next batch while the trainer trains.

The trainer submits (rows, step) jobs in step order; one producer thread takes them in turn, pins
the policy the server currently serves (`policy_fn()` -> (served name, version)), and streams the
batch's groups into a per-step handle as they arrive. The trainer's `get(step)` then reads those
groups, timing how long it actually waited (`gen_wait_s`).

Staleness is bounded: a batch for step s (which trains after s-1 optimizer updates) is started
only once the served policy holds at least s-1-max_staleness updates, so `staleness = (s-1) -
version <= max_staleness` (= `trl.vllm_sync_interval`). With one batch of lookahead the gate never
has to wait; it is what keeps a deeper lookahead honest. `notify_sync()` wakes it after a sync.

Waiting is measured with `clock` (default `time.monotonic`), read only when the trainer actually
blocks: a batch already there costs no wait. Tests swap in a simulated clock to force and check
exact interleavings (generation slower than training, and the reverse) on any machine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

_END = object()


@dataclass
class BatchHandle:
    """The groups of one step's batch, arriving from the producer thread."""

    step: int
    policy_name: str
    policy_version: int
    clock: Callable[[], float] = time.monotonic
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    wait_s: float = 0.0
    """Seconds the trainer spent blocked on this batch (waiting for it to start, then for its
    groups), by `clock`."""
    _queue: "queue.Queue[Any]" = field(default_factory=queue.Queue)

    def groups(self, stop: threading.Event | None = None) -> Iterator[Any]:
        """Yield the groups in arrival order; re-raise a producer error; account waiting time."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:  # not there yet: the trainer waits on generation
                t0 = self.clock()
                while True:
                    try:
                        item = self._queue.get(timeout=0.2)
                        break
                    except queue.Empty:
                        if stop is not None and stop.is_set():
                            raise RuntimeError("the generation thread was stopped")
                self.wait_s += self.clock() - t0
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Prefetcher:
    """One producer thread; jobs run in submission order."""

    def __init__(self, produce: Callable[[list, int, str], Iterable[Any]],
                 policy_fn: Callable[[], tuple[str, int]], max_staleness: int, *,
                 clock: Callable[[], float] = time.monotonic):
        self.produce = produce
        self.policy_fn = policy_fn
        self.max_staleness = int(max_staleness)
        self.clock = clock
        """Measures waiting and generation time (`BatchHandle`); swap it before the first submit."""
        self._jobs: deque[tuple[list, int]] = deque()
        self._handles: dict[int, BatchHandle] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ebft-prefetch", daemon=True)
        self._thread.start()

    def submit(self, rows: list, step: int) -> None:
        with self._cond:
            self._jobs.append((list(rows), int(step)))
            self._cond.notify_all()

    def notify_sync(self) -> None:
        """The served policy changed (a sync finished): re-check the staleness gate."""
        with self._cond:
            self._cond.notify_all()

    def pending_steps(self) -> list[int]:
        with self._cond:
            return [s for _, s in self._jobs] + sorted(self._handles)

    def get(self, step: int, timeout: float | None = None) -> BatchHandle:
        """The handle of `step`'s batch once its generation has started (policy pinned)."""
        t0 = time.monotonic()  # for `timeout`, always real time
        waited_from = None
        with self._cond:
            if step not in self._handles:
                waited_from = self.clock()
            while step not in self._handles:
                if self._stop.is_set():
                    raise RuntimeError("the generation thread was stopped")
                if not self._thread.is_alive():
                    raise RuntimeError("the generation thread died")
                if step not in [s for _, s in self._jobs]:
                    raise KeyError(f"no batch was submitted for step {step}")
                remaining = None if timeout is None else timeout - (time.monotonic() - t0)
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"batch for step {step} did not start within {timeout}s")
                self._cond.wait(0.2 if remaining is None else min(0.2, remaining))
            handle = self._handles.pop(step)
        if waited_from is not None:
            handle.wait_s += self.clock() - waited_from
        return handle

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- producer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._jobs and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                rows, step = self._jobs[0]
                # staleness gate: the batch of `step` trains after step-1 updates
                while not self._stop.is_set():
                    name, version = self.policy_fn()
                    if (step - 1) - version <= self.max_staleness:
                        break
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                self._jobs.popleft()
                handle = BatchHandle(step=step, policy_name=name, policy_version=version,
                                     clock=self.clock, started=self.clock())
                self._handles[step] = handle
                self._cond.notify_all()
            try:
                for group in self.produce(rows, step, name):
                    if self._stop.is_set():
                        break
                    handle._queue.put(group)
            except BaseException as error:  # handed to the trainer, which raises it
                handle._queue.put(error)
            finally:
                handle.finished = self.clock()
                handle._queue.put(_END)
