"""Which OS jail generated code runs in: bubblewrap, else util-linux `unshare`, else none.

A backend is only offered after a probe: the full recipe, run once per process (cached) with a
program that checks the jail from inside (own PID namespace, no /etc, read-only /usr, only a
loopback interface, writable work dir, and uid 65534 when we are root). Its failure becomes the
reason in the refusal message. `EBFT_SANDBOX_BACKENDS` (comma list, default `bwrap,unshare`;
`none` for none) chooses which backends are tried, in order.

Layout of the jail, both backends: new user (when not root), mount, PID, network, IPC and UTS
namespaces; a read-only root holding only /usr, /bin, /lib*, the interpreter's prefix, a private
/proc and a minimal /dev; size-capped tmpfs for /tmp, /dev/shm and the work dir /sandbox; an empty
environment. Started as root, the jail drops to uid/gid 65534 (a user namespace would map the
program to host root, which RLIMIT_NPROC exempts and /proc/sys obeys); started as a user, it
runs in an unprivileged user namespace with nested ones disabled.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

JAIL_UID = 65534  # "nobody": what a jail started by root runs as
WORKDIR = "/sandbox"
PROGRAM = "/sandbox/prog.py"
JAIL_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# What Popen hands bwrap/unshare. Never inherit ours: bwrap's in-jail init is forked before
# --clearenv, so /proc/1/environ would show the trainer's environment (tokens included).
HOST_ENV = {"PATH": "/usr/bin:/bin"}
DEFAULT_ORDER = ("bwrap", "unshare")
UNSAFE_WARNING = ("pass@1 ran model-written code WITHOUT an OS sandbox (--unsafe-exec): only rlimits and a "
                  "timeout applied, so the code could read and write your files, use the network and leave "
                  "processes behind")
UNSAFE_NOTICE = ("WARNING: no OS sandbox works here and --unsafe-exec was given: pass@1 will run model-written "
                 "code with only rlimits and a timeout. It can read and write your files, use the network and "
                 "leave processes behind. Why no sandbox:")

INSTALL_HINT = (
    "Install bubblewrap (`sudo apt-get install bubblewrap`; `dnf install bubblewrap`, `pacman -S bubblewrap`). "
    "If it is installed and fails with a namespace error, unprivileged user namespaces are blocked here "
    "(sysctl user.max_user_namespaces=0 or kernel.unprivileged_userns_clone=0, Ubuntu's AppArmor "
    "restriction kernel.apparmor_restrict_unprivileged_userns=1, or a container's seccomp profile: run the "
    "container with --security-opt seccomp=unconfined, or evaluate in a VM). "
    "Or pass --unsafe-exec to run generated code with only rlimits and a timeout (no boundary; "
    "see docs/security.md)."
)


class SandboxUnavailable(RuntimeError):
    """No OS jail works on this machine and the user did not opt out with --unsafe-exec."""


@dataclass(frozen=True)
class Sizes:
    """Capacity of the jail's writable tmpfs mounts, in bytes (RLIMIT_AS does not count tmpfs)."""

    tmp: int = 64 << 20
    workdir: int = 64 << 20
    shm: int = 8 << 20


@dataclass(frozen=True)
class Launch:
    """How to start one jailed run: the command and the descriptors it must inherit."""

    argv: list[str]
    pass_fds: tuple[int, ...]


@dataclass(frozen=True)
class Backend:
    """A working jail (`bwrap`, `unshare`) or `unsafe` (no jail: rlimits and a timeout only)."""

    name: str
    executable: str | None = None

    @property
    def jailed(self) -> bool:
        return self.name != "unsafe"

    def launch(self, interpreter_args: list[str], program_fd: int, info_fd: int, sizes: Sizes) -> Launch:
        """The command that runs `python *interpreter_args` inside this jail with the program at PROGRAM.
        bwrap writes `{"child-pid": N}` (the jail's PID 1, as the host sees it) to `info_fd`; unshare
        writes nothing (it reaps its PID 1 itself before exiting)."""
        if self.name == "bwrap":
            return _bwrap_launch(self.executable or "bwrap", interpreter_args, program_fd, info_fd, sizes)
        if self.name == "unshare":
            return _unshare_launch(self.executable or "unshare", interpreter_args, program_fd, sizes)
        raise ValueError(f"backend {self.name!r} is not a jail")


UNSAFE = Backend("unsafe")


def interpreter() -> str:
    """The Python the jail runs: this one, resolved (a venv's python is a link into its base)."""
    return os.path.realpath(sys.executable)


def _is_root() -> bool:
    return os.geteuid() == 0


def _system_dirs() -> tuple[list[str], list[tuple[str, str]]]:
    """(/usr-like dirs to bind read-only, (target, link) symlinks): works for merged and split /usr."""
    binds, links = ["/usr"], []
    for d in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(d):
            links.append((os.readlink(d), d))
        elif os.path.isdir(d):
            binds.append(d)
    prefix = os.path.realpath(sys.base_prefix)
    exe_dir = os.path.dirname(os.path.dirname(interpreter()))
    for extra in (prefix, exe_dir):
        if not any(extra == b or extra.startswith(b + "/") for b in binds):
            binds.append(extra)
    return binds, links


def _bwrap_launch(exe: str, interpreter_args: list[str], program_fd: int, info_fd: int, sizes: Sizes) -> Launch:
    binds, links = _system_dirs()
    argv = [exe]
    if _is_root():
        # No user namespace: it would map the program to host root. bwrap keeps only the capabilities
        # setpriv needs to become nobody; setpriv then drops those too and sets no_new_privs.
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                 "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-all", "--unshare-user", "--disable-userns"]
    argv += ["--die-with-parent", "--new-session", "--info-fd", str(info_fd), "--clearenv", "--hostname", "jail"]
    for key, value in JAIL_ENV.items():
        argv += ["--setenv", key, value]
    made: set[str] = set()
    for path in binds:
        for parent in reversed(Path(path).parents[:-1]):  # bwrap would create them 0700
            if str(parent) not in made:
                made.add(str(parent))
                argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", path, path]
    for target, link in links:
        argv += ["--symlink", target, link]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    for path, size in (("/dev/shm", sizes.shm), ("/tmp", sizes.tmp), (WORKDIR, sizes.workdir)):
        argv += ["--perms", "1777", "--size", str(size), "--tmpfs", path]
    argv += ["--perms", "0644", "--file", str(program_fd), PROGRAM, "--chdir", WORKDIR, "--"]
    if _is_root():
        argv += [shutil.which("setpriv") or "/usr/bin/setpriv", f"--reuid={JAIL_UID}", f"--regid={JAIL_UID}",
                 "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return Launch(argv + [interpreter(), *interpreter_args], (program_fd, info_fd))


def _unshare_launch(exe: str, interpreter_args: list[str], program_fd: int, sizes: Sizes) -> Launch:
    binds, links = _system_dirs()
    root = _is_root()
    cfg = {
        "mountpoint": "/tmp",  # any directory: the new root's tmpfs is mounted over it in our mount namespace
        "ro_binds": binds, "symlinks": links,
        "tmpfs": [["/tmp", sizes.tmp, 0o1777], ["/dev/shm", sizes.shm, 0o1777], [WORKDIR, sizes.workdir, 0o1777]],
        "program_fd": program_fd, "program": PROGRAM, "workdir": WORKDIR,
        "uid": JAIL_UID if root else None, "userns": not root,
        "argv": [interpreter(), *interpreter_args], "env": JAIL_ENV,
    }
    init = (Path(__file__).with_name("unshare_init.py")).read_text(encoding="utf-8")
    setpriv = shutil.which("setpriv") or "setpriv"
    argv = [setpriv, "--pdeathsig", "KILL", "--", exe]  # unshare dies with the thread that started it
    if not root:
        argv += ["--user", "--map-root-user"]
    argv += ["--mount", "--propagation", "private", "--pid", "--kill-child", "--net", "--ipc", "--uts", "--",
             interpreter(), "-I", "-S", "-B", "-c", init, json.dumps(cfg)]
    return Launch(argv, (program_fd,))


PROBE_PROGRAM = """
import os, socket
EXPECT_UID = %d
assert os.getpid() <= 3, f"not in a PID namespace of its own (pid {os.getpid()})"
assert not os.path.exists("/etc"), "the host's /etc is visible"
names = [n for _, n in socket.if_nameindex()]
assert names == ["lo"], f"network interfaces visible: {names}"
try:
    open("/usr/.ebft-probe", "w")
except OSError:
    pass
else:
    raise AssertionError("/usr is writable")
open("scratch", "w").write("ok")
assert not EXPECT_UID or os.getuid() == EXPECT_UID, f"running as uid {os.getuid()}, not {EXPECT_UID}"
print("jail-ok")
"""


def _probe(backend: Backend) -> str | None:
    """None when `backend` builds a working jail here, else why not."""
    from ebft_engine.sandbox.runner import run_program

    if not backend.executable:
        return f"`{backend.name}` is not installed"
    if (backend.name == "unshare" or _is_root()) and not shutil.which("setpriv"):
        return "`setpriv` (util-linux) is not installed"
    program = PROBE_PROGRAM % (JAIL_UID if _is_root() else 0)
    try:
        res = run_program(program, backend=backend, timeout_s=60, audit_hook=False)
    except OSError as error:
        return f"could not start it: {error}"
    if res.passed and "jail-ok" in res.stdout:
        return None
    detail = (res.stderr.strip().splitlines() or [res.status])[-1]
    return f"its test jail failed ({res.status}): {detail}"


@functools.lru_cache(maxsize=None)
def probe(name: str) -> tuple[Backend | None, str | None]:
    """(backend, None) when `name` works here, else (None, reason). Cached: runs once per process."""
    if name not in DEFAULT_ORDER:
        return None, f"unknown sandbox backend {name!r} (known: {', '.join(DEFAULT_ORDER)})"
    backend = Backend(name, shutil.which(name))
    reason = _probe(backend)
    return (backend, None) if reason is None else (None, reason)


def backend_order() -> list[str]:
    raw = os.environ.get("EBFT_SANDBOX_BACKENDS")
    if raw is None:
        return list(DEFAULT_ORDER)
    return [n.strip() for n in raw.split(",") if n.strip() and n.strip() != "none"]


def detect_backend() -> tuple[Backend | None, list[str]]:
    """The first working backend in `backend_order()`, and why each one before it did not work."""
    reasons = []
    for name in backend_order():
        backend, reason = probe(name)
        if backend is not None:
            return backend, reasons
        reasons.append(f"{name}: {reason}")
    return None, reasons or ["no backend allowed (EBFT_SANDBOX_BACKENDS=none)"]


def require_backend(unsafe_exec: bool = False) -> Backend:
    """The jail to run generated code in; UNSAFE only when the user asked for it and none works."""
    backend, reasons = detect_backend()
    if backend is not None:
        return backend
    if unsafe_exec:
        return UNSAFE
    raise SandboxUnavailable(
        "pass@1 runs model-written code and needs an OS sandbox, but none works here:\n"
        + "".join(f"  - {r}\n" for r in reasons) + INSTALL_HINT
    )
