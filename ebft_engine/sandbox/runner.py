"""Run one program in the jail and report how it ended, whatever the program does.

Layers, outermost first: the OS jail (backends.py); rlimits set inside it and the audit-hook
tripwire (boot.py); an empty environment; a wall-clock timeout that SIGKILLs the jail's PID 1,
which takes every process of its PID namespace with it; output captured in temporary files and
read up to a cap, never through pipes a grandchild could hold open. `run_program` returns only
once the whole namespace is gone, so nothing a program starts outlives its verdict.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ebft_engine.sandbox.backends import HOST_ENV, PROGRAM, Backend, Sizes, require_backend

BOOT_SOURCE = Path(__file__).with_name("boot.py").read_text(encoding="utf-8")
NPROC = 32  # processes per jail (counted inside its user namespace, or for uid 65534 when root)
NOFILE = 64
REAP_S = 30.0  # how long a dying namespace may take to empty (a fork bomb's hundreds of processes)


@dataclass
class SandboxResult:
    """Outcome of one program. `passed` means it exited 0 within every limit."""

    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error"
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str
    backend: str = ""


def run_program(
    source: str,
    *,
    backend: Backend | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_file_mb: int = 16,
    max_output_chars: int = 20_000,
    audit_hook: bool = True,
    label: str = "",
) -> SandboxResult:
    """Run `source` as a Python program in `backend` (default: the jail that works here, else
    SandboxUnavailable) and report how it ended. `label` only tags the process command line.

    Call it from the thread that should own the jail: bwrap and unshare die with that thread.
    """
    backend = backend or require_backend()
    rlimits = {"CPU": max(1, int(timeout_s) + 1), "AS": memory_mb << 20, "FSIZE": max_file_mb << 20,
               "NOFILE": NOFILE, "CORE": 0}
    if backend.jailed:
        rlimits["NPROC"] = NPROC  # outside a jail it would count every process of the user
    settings = json.dumps({"rlimits": rlimits, "audit_hook": audit_hook})
    boot = ["-I", "-S", "-B", "-u", "-c", BOOT_SOURCE, settings]
    tail = [label] if label else []
    with tempfile.TemporaryFile() as prog, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        prog.write(source.encode("utf-8"))
        prog.flush()
        prog.seek(0)
        if backend.jailed:
            status, returncode, duration = _run_jailed(backend, boot + [PROGRAM] + tail, prog.fileno(), out, err,
                                                       timeout_s)
        else:
            status, returncode, duration = _run_unjailed(boot, tail, source, out, err, timeout_s)
        return SandboxResult(
            passed=status == "passed", status=status, returncode=returncode, duration_s=duration,
            stdout=_read_capped(out, max_output_chars, tail=False),
            stderr=_read_capped(err, max_output_chars, tail=True), backend=backend.name,
        )


def run_programs(programs: list[str], *, backend: Backend, timeout_s: float, labels: list[str] | None = None,
                 workers: int | None = None) -> list[SandboxResult]:
    """Run each program in its own jail, several at once (pass@1 scoring); results in input order."""
    labels = labels or [""] * len(programs)
    workers = workers or max(1, min(4, os.cpu_count() or 1, len(programs)))

    def one(program: str, label: str) -> SandboxResult:
        # the pool thread that starts a jail also waits for it: a jail dies with the thread that started it
        return run_program(program, backend=backend, timeout_s=timeout_s, label=label)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs, labels))


def _run_jailed(backend: Backend, args: list[str], program_fd: int, out, err,
                timeout_s: float) -> tuple[str, int | None, float]:
    info_r, info_w = os.pipe()
    try:
        launch = backend.launch(args, program_fd, info_w, Sizes())
        start = time.monotonic()
        try:
            proc = subprocess.Popen(launch.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=HOST_ENV,
                                    pass_fds=launch.pass_fds, start_new_session=True)
        except OSError as error:
            err.write(f"could not start the sandbox: {error}\n".encode())
            return "error", None, 0.0
        os.close(info_w)
        info_w = -1
        try:
            proc.wait(timeout=timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            # on timeout (or an exception here): kill the namespace; in every case wait until it is empty
            _end_jail(proc, _read_child_pid(info_r))
        return status, proc.returncode, time.monotonic() - start
    finally:
        os.close(info_r)
        if info_w >= 0:
            os.close(info_w)


def _read_child_pid(info_r: int) -> int | None:
    """The jail's PID 1 as bwrap reported it (None from unshare, or when the jail never started)."""
    os.set_blocking(info_r, False)
    try:
        return int(json.loads(os.read(info_r, 65536))["child-pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _jail_init(proc: subprocess.Popen, child_pid: int | None) -> int | None:
    """A pidfd for the jail's PID 1: bwrap's report, else the outer process's only child (unshare)."""
    pids = [child_pid] if child_pid else []
    if not pids and proc.returncode is None:
        try:
            pids = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except OSError:
            pids = []
    for pid in pids:
        try:
            return os.pidfd_open(pid)
        except OSError:
            pass
    return None


def _end_jail(proc: subprocess.Popen, child_pid: int | None) -> None:
    """Kill the jail's PID 1 if still running and wait until it has died.

    The kernel kills every process of a PID namespace when its init dies, and marks that init dead
    only once all of them are gone; bwrap's outer process may exit before that (it exits as soon as
    the program does), so we wait on the init itself, through a pidfd."""
    pidfd = _jail_init(proc, child_pid)
    try:
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            select.select([pidfd], [], [], REAP_S)  # readable once the init has exited
        if proc.poll() is None:
            proc.kill()  # no init found (the jail was still being built): bwrap/unshare take it down
        proc.wait()
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _run_unjailed(boot: list[str], tail: list[str], source: str, out, err,
                  timeout_s: float) -> tuple[str, int | None, float]:
    """--unsafe-exec: a fresh interpreter in its own session and temp dir, rlimits, a timeout; no jail."""
    workdir = Path(tempfile.mkdtemp(prefix="ebft-unsafe-"))
    try:
        (workdir / "prog.py").write_text(source, encoding="utf-8")
        argv = [os.path.realpath(sys.executable), *boot, str(workdir / "prog.py"), *tail]
        env = {**HOST_ENV, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=workdir,
                                    start_new_session=True)
        except OSError as error:
            err.write(f"could not start the program: {error}\n".encode())
            return "error", None, 0.0
        try:
            proc.wait(timeout=timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            _kill_group(proc.pid)  # its session: all a process group can reach without a jail
            proc.wait()
        return status, proc.returncode, time.monotonic() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(f, limit: int, tail: bool) -> str:
    """At most `limit` bytes of a capture file: its start (stdout) or its end (stderr: the traceback)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit) if tail else 0)
    return f.read(limit).decode("utf-8", "replace")


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program whose exit status is a HumanEval task's verdict (as the official harness builds it)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
