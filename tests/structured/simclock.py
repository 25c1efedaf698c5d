"""A simulated clock for the async prefetcher's wait accounting (`Prefetcher.clock`).

Time moves only when a test calls `advance`, so measured waits are exact numbers, whatever the
machine's speed or load. The prefetcher reads its clock on the trainer's side only when the trainer
is about to block (and when it stops blocking), so "the trainer read the clock" means "the trainer
is waiting now": `wait_for_trainer_read` lets a scripted generation thread hold its batch back until
then, forcing the interleaving a test is about.
"""

from __future__ import annotations

import threading


class SimClock:
    def __init__(self, trainer_thread: int | None = None, start: float = 1000.0) -> None:
        self.now = start  # not 0: like time.monotonic, and `finished or now` stays meaningful
        self.trainer = trainer_thread if trainer_thread is not None else threading.get_ident()
        self.trainer_reads = 0
        self._cond = threading.Condition()

    def __call__(self) -> float:
        with self._cond:
            if threading.get_ident() == self.trainer:
                self.trainer_reads += 1
                self._cond.notify_all()
            return self.now

    def advance(self, seconds: float) -> None:
        with self._cond:
            self.now += seconds

    def wait_for_trainer_read(self, after: int, timeout: float = 120.0) -> None:
        """Block until the trainer has read the clock more than `after` times in all. The timeout
        only turns a broken interleaving into a clear failure instead of a hang."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.trainer_reads > after, timeout):
                raise AssertionError(f"the trainer never blocked (clock reads stayed at {after})")


def wait_event(event: threading.Event, what: str, timeout: float = 120.0) -> None:
    """`event.wait` that fails clearly instead of hanging when an interleaving breaks."""
    if not event.wait(timeout):
        raise AssertionError(f"timed out waiting for: {what}")
