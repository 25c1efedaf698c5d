"""First code to run inside the jail, before the generated program (standard library only).

The runner starts it as `python -I -S -B -u -c <this file's text> SETTINGS PROGRAM [LABEL]`:
SETTINGS is JSON with the rlimits to set and whether to install the audit hook; LABEL is ignored
(it only names the process for `ps` and for tests that look for survivors).

Rlimits are set here, inside the jail, on purpose: RLIMIT_NPROC set outside would count every host
process of the user, and RLIMIT_AS set in the trainer would starve CUDA. The audit hook is a second
layer only (a tripwire that gives readable errors): the boundary is the jail around this process.
"""

from __future__ import annotations

import json
import os
import resource
import sys


def set_rlimits(limits: dict[str, int]) -> None:
    """Soft = hard, so the program cannot raise them again (CPU: SIGXCPU, then SIGKILL a second later)."""
    for name, value in limits.items():
        hard = value + 1 if name == "CPU" else value
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, hard))


def install_audit_hook(root: str) -> None:
    """Refuse writes outside `root`, sockets, process creation, signals and ctypes (tripwire only)."""
    root = os.path.realpath(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                   "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                   "shutil.copytree"}
    denied = {"socket.connect", "socket.bind", "socket.__new__", "socket.getaddrinfo", "subprocess.Popen",
              "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
              "os.killpg", "pty.spawn", "ctypes.dlopen", "os.chdir"}

    def inside(path: object) -> bool:
        try:
            p = os.path.realpath(f"/proc/self/fd/{path}" if isinstance(path, int) else os.fsdecode(path))
        except (TypeError, ValueError, OSError):
            return False
        return p == root or p.startswith(root + os.sep) or p == "/dev/null"

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing outside the sandbox directory is not allowed: {path!r}")
        elif event in path_events:
            if any(isinstance(a, (str, bytes, os.PathLike)) and not inside(a) for a in args):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed")
        elif event in denied:
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def main() -> None:
    settings = json.loads(sys.argv[1])
    program = sys.argv[2]
    set_rlimits(settings["rlimits"])
    with open(program, encoding="utf-8") as f:
        code = compile(f.read(), program, "exec")
    if settings["audit_hook"]:
        install_audit_hook(os.getcwd())
    sys.argv = [program]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
