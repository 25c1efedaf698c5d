"""One launcher per run directory: `RUN_DIR/launcher.lock`.

The launcher that supervises a run (`ebft run --headless`, the TUI's run keeper, the `ebft train`
wrapper) creates the file with O_EXCL before it starts anything and removes it when the run is
over. It holds JSON: pid, host, the pid's start time, when the lock was taken and the command.
A second launcher is refused and told who holds the run. A lock is stale, and is taken over, when
it names this host and its pid is dead or now belongs to another process (pid reuse: the process
started after the lock was written). A lock from another host is never taken over: we cannot
see its processes, so the message says to remove it by hand once that run is over.

The engine does not read it: processes and files are the contract, and only launchers take it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

LOCK_NAME = "launcher.lock"
_SLACK_S = 2.0  # a pid's start time vs the time the lock was taken (clock granularity)


@dataclass
class LockInfo:
    pid: int
    host: str
    started_at: float  # when the lock was taken
    pid_started_at: float | None = None  # the holder's process start time (pid reuse check)
    command: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        cmd = f" ({self.command})" if self.command else ""
        return f"pid {self.pid} on {self.host}, since {when}{cmd}"


class RunDirLocked(RuntimeError):
    """Another live launcher supervises this run directory."""

    def __init__(self, run_dir: Path, holder: LockInfo):
        self.run_dir = Path(run_dir)
        self.holder = holder
        here = holder.host == socket.gethostname()
        fix = (f"follow it with `ebft watch {self.run_dir}`, or start in another folder (--run-dir or "
               "output_dir=...)")
        if not here:
            fix += f"; if that run is over, remove {self.run_dir / LOCK_NAME}"
        super().__init__(f"{self.run_dir} is in use by a running launcher: {holder.describe()}; {fix}")


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def read_lock(run_dir: str | Path) -> LockInfo | None:
    """The lock's content, or None when there is none (or it is unreadable garbage)."""
    try:
        data = json.loads(lock_path(run_dir).read_text(encoding="utf-8"))
        return LockInfo(pid=int(data["pid"]), host=str(data["host"]), started_at=float(data["started_at"]),
                        pid_started_at=(float(data["pid_started_at"]) if data.get("pid_started_at") is not None
                                        else None),
                        command=str(data.get("command") or ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def holder_alive(info: LockInfo) -> bool:
    """True unless the lock is provably stale (this host, and the pid is dead or reused)."""
    if info.host != socket.gethostname():
        return True
    try:
        proc = psutil.Process(info.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True
    ref = info.pid_started_at if info.pid_started_at is not None else info.started_at
    if info.pid_started_at is not None:
        return abs(started - ref) <= _SLACK_S
    return started <= ref + _SLACK_S


def live_holder(run_dir: str | Path) -> LockInfo | None:
    """Who supervises this run directory now (None: nobody, or a stale lock)."""
    info = read_lock(run_dir)
    return info if info is not None and holder_alive(info) else None


def acquire(run_dir: str | Path, pid: int | None = None, command: str | None = None) -> LockInfo:
    """Take the run dir for `pid` (default: this process). Raises `RunDirLocked`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid() if pid is None else pid
    info = LockInfo(pid=pid, host=socket.gethostname(), started_at=time.time(), pid_started_at=_start_time(pid),
                    command=command if command is not None else " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]))
    path = lock_path(run_dir)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held = read_lock(run_dir)
            if held is not None and held.pid == pid and held.host == info.host and holder_alive(held):
                return held  # ours already (a restart)
            if held is not None and holder_alive(held):
                raise RunDirLocked(run_dir, held) from None
            if held is None and _fresh(path):
                continue  # being written right now by another launcher: look again
            _remove_stale(path, held)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(info), f)
            f.write("\n")
        return info
    held = read_lock(run_dir)
    if held is not None:
        raise RunDirLocked(run_dir, held)
    raise RunDirLocked(run_dir, LockInfo(pid=0, host="?", started_at=time.time(), command="unreadable lock file"))


def _fresh(path: Path) -> bool:
    try:
        if time.time() - path.stat().st_mtime < 1.0:
            time.sleep(0.05)
            return True
    except OSError:
        pass
    return False


def _remove_stale(path: Path, seen: LockInfo | None) -> None:
    """Remove the stale lock we read. It is renamed aside first and checked: if another launcher
    replaced it meanwhile with its own live lock, that one is put back (link fails if taken)."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    try:
        moved = _read_file(aside)
        if moved is not None and moved != seen and holder_alive(moved):
            try:
                os.link(aside, path)
            except OSError:
                pass
    finally:
        try:
            os.unlink(aside)
        except OSError:
            pass


def _read_file(path: Path) -> LockInfo | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockInfo(**{k: data.get(k) for k in ("pid", "host", "started_at", "pid_started_at", "command")})
    except (OSError, ValueError, TypeError):
        return None


def release(run_dir: str | Path, pid: int | None = None) -> bool:
    """Remove the lock if `pid` (default: this process) holds it. True when removed."""
    pid = os.getpid() if pid is None else pid
    held = read_lock(run_dir)
    if held is None or held.pid != pid or held.host != socket.gethostname():
        return False
    try:
        lock_path(run_dir).unlink()
        return True
    except OSError:
        return False


def as_dict(info: LockInfo | None) -> dict[str, Any] | None:
    return asdict(info) if info is not None else None
