"""The async prefetcher alone (no model, no server): staleness gate and wait accounting, with the
interleavings forced by events and a simulated clock, so nothing depends on the machine's speed."""

from __future__ import annotations

import threading

import pytest

from ebft_engine.rollout.prefetch import Prefetcher
from simclock import SimClock, wait_event

pytestmark = pytest.mark.timeout(120)


class Policy:
    """The served policy, moved by the test; records every gate check the producer makes."""

    def __init__(self) -> None:
        self.version = 0
        self.checks: list[int] = []
        self._cond = threading.Condition()

    def __call__(self) -> tuple[str, int]:
        with self._cond:
            self.checks.append(self.version)
            self._cond.notify_all()
            return f"v{self.version}", self.version

    def wait_checks(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.checks) >= n, 60), self.checks


def test_staleness_gate_holds_a_deeper_lookahead_until_the_policy_syncs():
    """max_staleness 1, four batches queued at once: batch s may start only once the served policy
    holds s-1-1 updates. Batches 3 and 4 wait at the gate until the test publishes versions 1, 2."""
    policy = Policy()
    pf = Prefetcher(lambda rows, step, name: [(step, name)], policy, max_staleness=1)
    try:
        for step in (1, 2, 3, 4):
            pf.submit([f"row{step}"], step)
        assert [pf.get(s, timeout=60).policy_version for s in (1, 2)] == [0, 0]
        # the producer has checked the gate for batch 3 (third check) and found version 0 too old;
        # it re-checks at its own pace and must keep refusing while the version stays 0
        policy.wait_checks(4)
        with pytest.raises(TimeoutError, match="step 3"):
            pf.get(3, timeout=0)
        assert set(policy.checks[2:]) == {0}
        policy.version = 1
        pf.notify_sync()
        h3 = pf.get(3, timeout=60)
        assert (h3.policy_name, h3.policy_version) == ("v1", 1)
        assert list(h3.groups()) == [(3, "v1")]
        n = len(policy.checks)
        policy.wait_checks(n + 1)  # batch 4 checked against version 1: (4-1) - 1 = 2 > 1
        with pytest.raises(TimeoutError, match="step 4"):
            pf.get(4, timeout=0)
        policy.version = 2
        pf.notify_sync()
        assert pf.get(4, timeout=60).policy_version == 2
        with pytest.raises(KeyError, match="step 5"):
            pf.get(5)
    finally:
        pf.close()


def test_wait_is_the_blocked_time_and_a_ready_batch_costs_none():
    """Batch 1 is held back until the trainer blocks on it, then 'generates' for 2.5 simulated
    seconds: the trainer waited exactly 2.5 s, and that was the batch's whole generation time.
    Batch 2 is complete before the trainer asks, and the trainer spends 4 simulated seconds
    elsewhere first: it waited 0 s."""
    clock = SimClock()
    started, done = threading.Event(), {1: threading.Event(), 2: threading.Event()}

    def produce(rows, step, name):
        if step == 1:
            started.set()  # pinned: get(1) will not block, so the trainer's first read is in groups()
            clock.wait_for_trainer_read(after=0)  # the trainer is blocked on this batch
            clock.advance(2.5)
        yield f"group-{step}-a"
        yield f"group-{step}-b"
        done[step].set()

    pf = Prefetcher(produce, lambda: ("base", 0), max_staleness=1, clock=clock)
    try:
        pf.submit(["a"], 1)
        wait_event(started, "batch 1 pinned")
        h1 = pf.get(1, timeout=60)
        assert list(h1.groups()) == ["group-1-a", "group-1-b"]
        assert h1.wait_s == 2.5 and h1.finished - h1.started == 2.5
        pf.submit(["b"], 2)
        wait_event(done[2], "batch 2 generated")
        clock.advance(4.0)  # the trainer trains meanwhile
        h2 = pf.get(2, timeout=60)
        assert list(h2.groups()) == ["group-2-a", "group-2-b"]
        assert h2.wait_s == 0.0
    finally:
        pf.close()


def test_a_producer_error_reaches_the_trainer():
    def produce(rows, step, name):
        yield "first"
        raise ValueError("server said no")

    pf = Prefetcher(produce, lambda: ("base", 0), max_staleness=1)
    try:
        pf.submit(["a"], 1)
        groups = pf.get(1, timeout=60).groups()
        assert next(groups) == "first"
        with pytest.raises(ValueError, match="server said no"):
            next(groups)
    finally:
        pf.close()
