"""Wait for the generation server: GET /health until 200, while checking it is still alive.

Every request has its own timeout (a blackholed route must not block past the deadline), the
overall deadline governs every outcome (a route answering 503 forever is as dead as an unreachable
one), and a server that exits while we wait fails at once with the tail of its log.
HTTP through httpx (a dependency already), without the environment's proxies: the server is on
loopback and http_proxy must not intercept the probe.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

import httpx

from ebft_tui.runs.tail import tail_lines


class ReadinessError(RuntimeError):
    def __init__(self, reason: str, log_tail: list[str] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail or []


def probe(url: str, timeout_s: float = 2.0) -> int | None:
    """HTTP status of GET url, or None when nothing answers (blocking; for scripts)."""
    try:
        with httpx.Client(trust_env=False, timeout=timeout_s) as client:
            return client.get(url).status_code
    except (httpx.HTTPError, OSError, ValueError):
        return None


async def aprobe(client: httpx.AsyncClient, url: str, timeout_s: float) -> int | None:
    """HTTP status of GET url, or None when nothing answers within `timeout_s`."""
    try:
        resp = await asyncio.wait_for(client.get(url, timeout=timeout_s), timeout_s + 0.5)
        return resp.status_code
    except (httpx.HTTPError, OSError, ValueError, asyncio.TimeoutError):
        return None


async def wait_ready(
    url: str,
    proc: asyncio.subprocess.Process,
    timeout_s: float,
    log_path: Path | None = None,
    poll_s: float = 1.0,
    request_timeout_s: float = 2.0,
    on_wait: Callable[[float, int | None], None] | None = None,
) -> float:
    """Seconds it took until `url` answered 200. Raises ReadinessError otherwise."""
    start = time.monotonic()
    deadline = start + timeout_s
    last: int | None = None

    def tail() -> list[str]:
        return tail_lines(log_path, 20) if log_path else []

    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            if proc.returncode is not None:
                raise ReadinessError(f"exited with code {proc.returncode} before it was ready", tail())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = f"HTTP {last}" if last else "no answer"
                raise ReadinessError(f"not ready after {timeout_s:.0f} s (last probe: {what} from {url})", tail())
            last = await aprobe(client, url, max(0.1, min(request_timeout_s, remaining)))
            if last == 200:
                return time.monotonic() - start
            if on_wait is not None:
                on_wait(time.monotonic() - start, last)
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(proc.wait(), max(0.0, min(poll_s, remaining)))
            except asyncio.TimeoutError:
                pass
