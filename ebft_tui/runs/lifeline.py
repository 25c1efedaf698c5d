"""Tie a child's life to its launcher: `PR_SET_PDEATHSIG` through a tiny exec shim.

`prctl(PR_SET_PDEATHSIG)` must run in the child between fork and exec. Popen's `preexec_fn` can
deadlock when the parent has threads (Textual has), so the child is started as

    python -I -S -c SHIM PARENT_PID SIGNAL -- argv...

The shim (stdlib only, no site, ~20 ms) sets the death signal, checks that its parent is still
`PARENT_PID` (the launcher may have died before the prctl: then it exits 128+SIGNAL at once), marks
`EBFT_PDEATHSIG` in the environment (so the engine does not replace the signal with its own) and
execs the real command. The death signal survives exec, and the pid stays the same, so the launcher
still watches, signals and reaps the real program.

The kernel sends the signal when the *thread* that forked the child exits: spawn from the event
loop thread (the supervisor) or from a thread that waits for the child (`subprocess.run`).
Linux only; elsewhere `guard_argv` returns argv unchanged and the engine's `EBFT_PARENT_PID`
watchdog is the only net. The watchdog stays as a fallback on Linux too (a wrapper between the
launcher and the engine, or a launcher that is not ours).
"""

from __future__ import annotations

import os
import signal
import sys

# Runs in a bare interpreter (-I -S): keep it to builtins, os, sys and ctypes.
SHIM = (
    "import ctypes,os,sys\n"
    "ppid=int(sys.argv[1]);sig=int(sys.argv[2]);argv=sys.argv[4:]\n"
    "ctypes.CDLL(None).prctl(1,sig,0,0,0)\n"
    "if os.getppid()!=ppid:os._exit(128+sig)\n"
    "os.environ['EBFT_PDEATHSIG']=str(sig)\n"
    "os.execvp(argv[0],argv)\n"
)


def supported() -> bool:
    return sys.platform.startswith("linux")


def guard_argv(argv: list[str], death_signal: int = signal.SIGKILL, parent_pid: int | None = None) -> list[str]:
    """`argv` wrapped so that the child receives `death_signal` the moment this process dies."""
    if not supported() or not argv:
        return list(argv)
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-I", "-S", "-c", SHIM, str(parent), str(int(death_signal)), "--", *argv]


def unguard_argv(argv: list[str]) -> list[str]:
    """The real command inside a guarded argv (for logs and command.txt)."""
    if len(argv) > 5 and argv[1:5] == ["-I", "-S", "-c", SHIM]:
        return argv[argv.index("--", 5) + 1:]
    return list(argv)


def exit_code(returncode: int) -> int:
    """A child's exit status in the shell's convention: 128+N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode
