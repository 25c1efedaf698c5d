"""Stop cleanly when asked, and never outlive the launcher (tui-conventions.md §6 rule 4).

- SIGTERM / SIGINT: while the training loop runs, the first one sets a flag the loop checks
  between steps (it finishes the step, checkpoints, writes a status record and exits 143/130);
  before the loop starts there is nothing to save and the process exits at once. A second SIGINT
  aborts; repeated SIGTERMs are ignored (the launcher's SIGKILL after its grace period is the bound).
- Launcher death: with `EBFT_PARENT_PID` set (the launcher sets it), a daemon thread polls
  `os.getppid()` (or, when a wrapper stands between them, whether that pid still exists); when the
  launcher is gone it SIGTERMs our own process group (children included)
  and, if the graceful stop has not finished within `grace_s`, exits hard. `PR_SET_PDEATHSIG` on
  Linux is belt and braces for the same case.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self.graceful = False
        """True while the training loop runs and will check `requested()` between steps."""

    def request(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()

    def requested(self) -> bool:
        return self.event.is_set()

    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGTERM)

    def reset(self) -> None:
        self.event.clear()
        self.signum = None
        self.graceful = False


STOP = _Stop()
"""The process-wide stop flag (one training loop per process)."""


def stop_requested() -> bool:
    return STOP.requested()


def _handle(signum: int, frame: object) -> None:
    already = STOP.requested()
    STOP.request(signum)
    if not STOP.graceful:
        raise SystemExit(128 + signum)
    if already:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        return
    name = signal.Signals(signum).name
    print(f"{name}: stopping after this step (checkpoint, then exit)", file=sys.stderr, flush=True)


def install_stop_handlers() -> None:
    """Route SIGTERM and SIGINT to the stop flag (main thread only)."""
    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)


def _set_pdeathsig(sig: int = signal.SIGTERM) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _terminate_self_and_group() -> None:
    try:
        if os.getpgrp() == os.getpid():  # we lead our own group (the launcher's start_new_session)
            os.killpg(os.getpgrp(), signal.SIGTERM)
        else:  # never signal a group we do not own (e.g. the user's shell job)
            os.kill(os.getpid(), signal.SIGTERM)
    except ProcessLookupError:
        pass


def start_parent_watchdog(poll_s: float = 0.5, grace_s: float = 60.0) -> threading.Thread | None:
    """Watch the launcher named by `EBFT_PARENT_PID`; no-op (None) when it is not set."""
    raw = os.environ.get("EBFT_PARENT_PID", "").strip()
    if not raw:
        return None
    try:
        parent = int(raw)
    except ValueError:
        print(f"EBFT_PARENT_PID={raw!r} is not a pid; launcher watchdog disabled", file=sys.stderr)
        return None
    direct = os.getppid() == parent
    if direct and not os.environ.get("EBFT_PDEATHSIG"):  # the launcher's exec shim set one already
        _set_pdeathsig(signal.SIGTERM)  # a parent that died before this call: the poll sees it at once

    def launcher_alive() -> bool:
        if direct:
            return os.getppid() == parent
        try:  # started through a wrapper (a shell, `time`...): watch the launcher's pid itself
            os.kill(parent, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def watch() -> None:
        while launcher_alive():
            time.sleep(poll_s)
        print(f"launcher (pid {parent}) is gone: stopping", file=sys.stderr, flush=True)
        _terminate_self_and_group()
        time.sleep(grace_s)  # a graceful stop (finish the step, checkpoint) ends the process first
        print(f"still running {grace_s:.0f}s after the launcher died: exiting", file=sys.stderr, flush=True)
        os._exit(STOP.exit_code())

    thread = threading.Thread(target=watch, name="ebft-parent-watchdog", daemon=True)
    thread.start()
    return thread
