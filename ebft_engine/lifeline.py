"""Children of the engine that die with it at once: PR_SET_PDEATHSIG, set without preexec_fn.

A server the engine starts (`vllm serve` under `ebft serve`, our hf server under
`vllm_launcher.spawn_server`) must not outlive the engine, even when the engine is SIGKILLed and no
handler of ours runs. Linux's `prctl(PR_SET_PDEATHSIG, sig)` has the kernel send `sig` to the
child when its parent dies. Setting it needs code between fork and exec; `subprocess`'s
`preexec_fn` runs Python there, which can deadlock when other threads hold locks at the fork (the
trainer has several: prefetch, HTTP pool) and is documented as unsafe with threads. So the child
starts as a tiny shim instead (`python -I -S -c SHIM`, standard library only, no site, no
imports of ours): it sets the death signal, checks that its parent is still the process that
started it (the parent may have died before the prctl), then `exec`s the real program. The death
signal survives exec (not into set-uid programs, which servers are not).

The kernel sends it when the *thread* that forked the child ends, not the process; so `spawn` forks
from the main thread, or else from one long-lived spawner thread, never from a short-lived worker.
The launcher watchdog (`watchdog.py`) stays as the fallback where prctl is missing (not Linux).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

SHIM = """\
import ctypes, os, sys
parent, sig, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:  # the parent died before the prctl took effect
    os._exit(128 + sig)
try:
    os.execvp(argv[0], argv)
except OSError as error:
    sys.stderr.write("cannot start %s: %s\\n" % (argv[0], error.strerror))
    os._exit(127)
"""
"""The program between fork and exec (runs with `-I -S`: nothing of the environment or site)."""

_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def supported() -> bool:
    return sys.platform.startswith("linux")


def lifeline_argv(argv: Sequence[str], death_signal: int = signal.SIGTERM,
                  parent: int | None = None) -> list[str]:
    """`argv` behind the shim: it runs as `argv` once the death signal is set."""
    parent = os.getpid() if parent is None else parent
    return [sys.executable, "-I", "-S", "-c", SHIM, str(parent), str(int(death_signal)), *argv]


def _spawner_thread() -> ThreadPoolExecutor:
    """One worker thread that lives as long as the process: the forking thread of every child
    spawned from a thread that may end before its child should."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ebft-spawner")
        return _spawner


def spawn(argv: Sequence[str], death_signal: int = signal.SIGTERM, **popen_kwargs: Any) -> subprocess.Popen:
    """`subprocess.Popen(argv, **popen_kwargs)` whose process gets `death_signal` when we die.

    SIGTERM by default: a server then shuts down its own children (vLLM's engine core) as it does
    on any SIGTERM. A missing program raises FileNotFoundError here, as Popen would."""
    argv = [str(a) for a in argv]
    if not supported():
        return subprocess.Popen(argv, **popen_kwargs)
    _check_program(argv[0], popen_kwargs)
    full = lifeline_argv(argv, death_signal)
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(full, **popen_kwargs)
    return _spawner_thread().submit(subprocess.Popen, full, **popen_kwargs).result()


def _check_program(program: str, popen_kwargs: dict[str, Any]) -> None:
    """FileNotFoundError now, as Popen would raise, rather than exit 127 from the shim later."""
    if os.sep in program:
        found = os.access(os.path.join(popen_kwargs.get("cwd") or "", program), os.X_OK)
    else:
        found = shutil.which(program, path=(popen_kwargs.get("env") or os.environ).get("PATH")) is not None
    if not found:
        raise FileNotFoundError(2, "No such file or directory (or not executable)", program)


def exit_code(returncode: int | None) -> int:
    """A child's status as a process exit code: 128+N when signal N ended it (the shell's
    convention; Popen reports -N)."""
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode
