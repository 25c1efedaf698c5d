"""Run untrusted generated code (pass@1 evaluation) in a confined subprocess.

Generated programs are never executed in the trainer's process. Each runs in a fresh interpreter
(`python -I -S`: no user site, no PYTHONPATH), in its own process group, with its own empty temp
directory as working directory, under rlimits (CPU seconds, address space, file size, open files),
a wall-clock timeout after which the whole group is killed, and a minimal environment.

Inside the child a guard installed before the program runs uses CPython audit hooks, which the
program cannot remove, to refuse: writing, creating, renaming or deleting files outside the temp
directory; opening sockets; starting processes (subprocess, os.system, exec, fork). Where the OS
allows it (root, or unprivileged user namespaces), the child also runs in a new network namespace
via `unshare --net`, so even a hook bypass through a C extension has no network.

This is defence in depth for evaluating model output, not a security boundary against a
determined attacker; run evaluations of untrusted models inside a container as well.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The guard runs in the child before the untrusted program. It only uses the standard library.
_GUARD = r'''
import os, sys, resource
def _install():
    _ROOT = os.path.realpath(sys.argv[1])
    _PROGRAM = sys.argv[2]
    _limits = [int(x) for x in sys.argv[3].split(",")]
    cpu_s, mem_bytes, fsize_bytes, nofile = _limits
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    if mem_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_bytes, fsize_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass

    def _inside(path):
        try:
            p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/proc/self/fd/%d" % path)
        except Exception:
            return False
        return p == _ROOT or p.startswith(_ROOT + os.sep) or p == "/dev/null"

    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                    "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree",
                    "shutil.move", "shutil.copyfile", "shutil.copytree"}
    _DENIED = {"socket.connect", "socket.bind", "socket.__new__", "socket.getaddrinfo",
               "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "os.fork", "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen",
               "os.chdir"}

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and path is not None and not _inside(path):
                raise PermissionError("sandbox: writing outside the sandbox directory is not allowed: %r" % (path,))
        elif event in _PATH_EVENTS:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                    raise PermissionError("sandbox: %s outside the sandbox directory is not allowed" % event)
        elif event in _DENIED:
            raise PermissionError("sandbox: %s is not allowed" % event)

    sys.addaudithook(_hook)
    return _PROGRAM
_PROGRAM = _install()
del _install
with open(_PROGRAM, "r", encoding="utf-8") as f:
    _source = f.read()
_code = compile(_source, "program.py", "exec")
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
exec(_code, _globals)
'''


@dataclass
class SandboxResult:
    """Outcome of one program. `passed` means it exited 0 within every limit."""

    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error"
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """`unshare --net --map-root-user` when the OS lets us make a network namespace, else nothing."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for prefix in ((exe, "--net"), (exe, "--net", "--map-root-user")):
        try:
            probe = subprocess.run([*prefix, sys.executable, "-c", "0"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def run_program(
    source: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_file_mb: int = 16,
    max_output_chars: int = 20_000,
    isolate_network: bool = True,
) -> SandboxResult:
    """Run `source` as a Python program in the sandbox and report how it ended."""
    workdir = Path(tempfile.mkdtemp(prefix="ebft-sandbox-"))
    try:
        program = workdir / "program.py"
        program.write_text(source, encoding="utf-8")
        guard = workdir / ".guard.py"
        guard.write_text(_GUARD, encoding="utf-8")
        limits = ",".join(
            str(x)
            for x in (max(1, int(timeout_s) + 1), memory_mb * 1024 * 1024, max_file_mb * 1024 * 1024, 64)
        )
        prefix = _unshare_prefix() if isolate_network else ()
        argv = [*prefix, sys.executable, "-I", "-S", str(guard), str(workdir), str(program), limits]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            status = "timeout"
        duration = time.monotonic() - start
        _kill_group(proc)  # nothing the program started may outlive it
        return SandboxResult(
            passed=status == "passed", status=status, returncode=proc.returncode, duration_s=duration,
            stdout=out.decode("utf-8", "replace")[:max_output_chars],
            stderr=err.decode("utf-8", "replace")[:max_output_chars],
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program whose exit status is a HumanEval task's verdict (as the official harness builds it)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
