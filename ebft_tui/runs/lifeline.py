"""Tie a child's life to its launcher: `PR_SET_PDEATHSIG` through a tiny exec shim, plus a guard
for the child's whole process group.

`prctl(PR_SET_PDEATHSIG)` must run in the child between fork and exec. Popen's `preexec_fn` can
deadlock when the parent has threads (Textual has), so the child is started as

    python -I -S -c SHIM FD PARENT_PID SIGNAL GRACE -- argv...

The shim (stdlib only, no site) sets the death signal, checks that its parent is still
`PARENT_PID` (the launcher may have died before the prctl: then it exits 128+SIGNAL at once),
marks `EBFT_PDEATHSIG` in the environment (so the engine keeps the signal instead of setting its
own) and execs the real command: the pid stays the same, so the launcher still watches, signals
and reaps the real program, and the death signal survives the exec.

A death signal reaches only the leader; what the leader started in its group (a grandchild, data
workers...) would outlive it. So with a lifeline pipe (`Lifeline`, FD >= 0) the shim first forks a
guard into the same group: it ignores SIGTERM/SIGINT/SIGHUP (a stop is for the leader to handle),
dies with the leader (its own death signal), and blocks reading the pipe, whose write end only
the launcher holds. When the launcher dies, however it dies, the kernel closes that end: the guard
sends SIGNAL to the whole group, and SIGKILL after GRACE seconds if that was gentler. Only a group
the child leads (start it with `start_new_session=True`): in a group it shares with others (the
launcher's own), the guard signals the leader alone.

The kernel sends a death signal when the *thread* that forked the child exits: spawn from the
event-loop thread (the supervisor) or from a thread that waits for the child (`subprocess.run`).
Linux only; elsewhere the argv is returned unchanged and the engine's `EBFT_PARENT_PID` watchdog
is the only net. That watchdog stays as the fallback on Linux too.
"""

from __future__ import annotations

import os
import signal
import sys

# Runs in a bare interpreter (-I -S): builtins, os, signal, sys, time and ctypes only.
SHIM = """\
import ctypes,os,signal,sys
fd,ppid,sig,grace=(int(a) for a in sys.argv[1:5]);argv=sys.argv[6:]
prctl=ctypes.CDLL(None).prctl
prctl(1,sig,0,0,0)
if os.getppid()!=ppid:os._exit(128+sig)
if fd>=0:
    leader=os.getpid()
    if os.fork()==0:
        try:
            import select
            for s in (signal.SIGTERM,signal.SIGINT,signal.SIGHUP):signal.signal(s,signal.SIG_IGN)
            closed=lambda t:bool(select.select([fd],[],[],t)[0]) and not os.read(fd,64)
            gone=False
            while os.getppid()==leader:
                if closed(0.2):gone=True;break
            else:gone=closed(0)
            if gone:
                hit=(lambda s:os.killpg(0,s)) if os.getpgrp()==leader else (lambda s:os.kill(leader,s))
                hit(sig)
                if sig!=signal.SIGKILL:
                    import time;time.sleep(grace);hit(signal.SIGKILL)
        finally:os._exit(0)
    os.close(fd)
os.environ['EBFT_PDEATHSIG']=str(sig)
os.execvp(argv[0],argv)
"""


def supported() -> bool:
    return sys.platform.startswith("linux")


def guard_argv(argv: list[str], death_signal: int = signal.SIGKILL, parent_pid: int | None = None,
               lifeline_fd: int = -1, grace_s: float = 10.0) -> list[str]:
    """`argv` wrapped so the child gets `death_signal` the moment this process dies (and, with a
    lifeline fd, its whole process group does)."""
    if not supported() or not argv:
        return list(argv)
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-I", "-S", "-c", SHIM, str(lifeline_fd), str(parent), str(int(death_signal)),
            str(max(0, int(grace_s))), "--", *argv]


def unguard_argv(argv: list[str]) -> list[str]:
    """The real command inside a guarded argv (for logs and command.txt)."""
    if len(argv) > 5 and argv[1:5] == ["-I", "-S", "-c", SHIM] and "--" in argv[5:]:
        return argv[argv.index("--", 5) + 1:]
    return list(argv)


class Lifeline:
    """A pipe whose write end only this process holds; children started with `argv(...)` and
    `pass_fds` get a guard that takes their process group down when this process dies."""

    def __init__(self) -> None:
        self.read_fd: int | None = None
        self.write_fd: int | None = None
        if supported():
            self.read_fd, self.write_fd = os.pipe()  # both close-on-exec: only pass_fds hands one on

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.read_fd,) if self.read_fd is not None else ()

    def argv(self, argv: list[str], death_signal: int = signal.SIGKILL, grace_s: float = 10.0) -> list[str]:
        fd = self.read_fd if self.read_fd is not None else -1
        return guard_argv(argv, death_signal, lifeline_fd=fd, grace_s=grace_s)

    def close(self) -> None:
        """Let go (the children's guards fire): only when nothing should survive us."""
        for fd in (self.read_fd, self.write_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.read_fd = self.write_fd = None


def exit_code(returncode: int) -> int:
    """A child's exit status in the shell's convention: 128+N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode
