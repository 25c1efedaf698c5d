"""Build the jail inside util-linux `unshare` (the fallback when bubblewrap is missing); standard library only.

The runner starts `unshare [--user --map-root-user] --mount --pid --fork --kill-child --net --ipc
--uts -- python -I -S -B -c <this file's text> CONFIG`, so this runs as PID 1 of fresh namespaces.
It lays out the jail the way bubblewrap does: a small tmpfs becomes the new root; /usr, the system
library dirs and the interpreter's prefix are bind-mounted read-only and nosuid; /proc is a new
procfs of the new PID namespace with /proc/sys and friends read-only; /dev holds only null, zero,
full, random and urandom; /tmp, /dev/shm and the work dir /sandbox are size-capped tmpfs; then
pivot_root and a lazy unmount drop the host's tree entirely (a chroot could be escaped by anyone
who regains CAP_SYS_CHROOT in a nested user namespace). Last, privileges go: root drops to uid
65534; in a user namespace every capability is dropped for good (bounding set, securebits), nested
user namespaces are disabled, and no_new_privs is set; SIGKILL-on-parent-death is re-armed (a uid
change clears it). Then PID 1 forks the boot script and reaps until it exits; when PID 1 exits the
kernel kills whatever is left in the namespace.

Any failure exits 125 with one line on stderr starting "ebft-jail:".
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
ST_RELATIME = 4096
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 28, 38, 47
# NOROOT, NOROOT_LOCKED, NO_SETUID_FIXUP, NO_SETUID_FIXUP_LOCKED, KEEP_CAPS_LOCKED
LOCKED_NO_ROOT_SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(errno)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or fstype} on {target}")


def _unescape(field: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as octal escapes."""
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(esc, ch)
    return field


def _mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [_unescape(line.split()[4]) for line in f]
    return sorted({p for p in points if p == path or p.startswith(path.rstrip("/") + "/")})


def remount_readonly(path: str) -> None:
    """Make `path` and every mount below it read-only and nosuid, keeping the flags the kernel locks
    when the mount came from a more privileged namespace (nodev, noexec, atime)."""
    for point in _mounts_under(path):
        try:
            st = os.statvfs(point)
        except OSError:
            continue  # a mount we cannot see into (e.g. an autofs trigger): leave it
        keep = st.f_flag & (MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
        keep |= MS_RELATIME if st.f_flag & ST_RELATIME else 0
        mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)


def make_dirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def bind_readonly(source: str, target: str) -> None:
    if os.path.isdir(source):
        make_dirs(target)
    else:
        make_dirs(os.path.dirname(target))
        open(target, "a").close()
    mount(source, target, None, MS_BIND | MS_REC)
    remount_readonly(target)


def build_root(cfg: dict) -> None:
    new = cfg["mountpoint"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in cfg["ro_binds"]:
        bind_readonly(path, new + path)
    for target, link in cfg["symlinks"]:
        os.symlink(target, new + link)
    # /dev: a tmpfs with the harmless character devices bound in, plus the usual links
    make_dirs(new + "/dev")
    mount("tmpfs", new + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        open(new + "/dev/" + name, "w").close()
        mount("/dev/" + name, new + "/dev/" + name, None, MS_BIND)
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{fd}", new + "/dev/" + name)
    os.symlink("/proc/self/fd", new + "/dev/fd")
    # size-capped writable tmpfs: /tmp, /dev/shm and the work dir
    owner = "" if cfg["uid"] is None else f",uid={cfg['uid']},gid={cfg['uid']}"
    for path, size, mode in cfg["tmpfs"]:
        make_dirs(new + path)
        mount("tmpfs", new + path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode={mode:o}{owner}")
    # the program, copied in from the descriptor the runner passed
    with os.fdopen(cfg["program_fd"], "rb") as src, open(new + cfg["program"], "wb") as dst:
        dst.write(src.read())
    os.chmod(new + cfg["program"], 0o644)
    if cfg["uid"] is not None:
        os.chown(new + cfg["program"], cfg["uid"], cfg["uid"])
    # a procfs of our own PID namespace; the kernel knobs in it read-only
    make_dirs(new + "/proc")
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if cfg["userns"]:
        with open(new + "/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")  # no nested user namespaces: they would hand the program capabilities again
    for sub in ("sys", "sysrq-trigger", "irq", "bus"):
        if os.path.exists(new + "/proc/" + sub):
            mount(new + "/proc/" + sub, new + "/proc/" + sub, None, MS_BIND | MS_REC)
            remount_readonly(new + "/proc/" + sub)
    mount(None, new, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # pivot_root, then detach the host's tree: nothing of it stays reachable
    os.chdir(new)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise JailError(f"pivot_root: no syscall number known for {platform.machine()}")
    _check(libc.syscall(number, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "detaching the host root")
    os.chdir(cfg["workdir"])


def drop_privileges(cfg: dict) -> None:
    if cfg["uid"] is not None:  # started as real root: become nobody (no capabilities survive setuid)
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    else:  # root of a user namespace: drop every capability so that no exec can regain one
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            last = int(f.read())
        for cap in range(last + 1):
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
        _check(libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0), "clearing ambient capabilities")
        _check(libc.prctl(PR_SET_SECUREBITS, LOCKED_NO_ROOT_SECUREBITS, 0, 0, 0), "setting securebits")
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable = 0, twice
        _check(libc.capset(header, data), "clearing capabilities")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")
    # unshare --kill-child armed SIGKILL-on-parent-death for us, but changing uid cleared it: re-arm
    _check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "setting the parent-death signal")


def run_as_init(cfg: dict) -> int:
    """Fork the boot script and reap every orphan until it exits; return its exit code."""
    child = os.fork()
    if child == 0:
        try:
            os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
        finally:
            os._exit(127)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


def main() -> None:
    cfg = json.loads(sys.argv[1])
    try:
        build_root(cfg)
        drop_privileges(cfg)
        os.closerange(3, 1 << 16)
    except (JailError, OSError) as error:
        print(f"ebft-jail: {error}", file=sys.stderr, flush=True)
        os._exit(125)
    sys.stdout.flush()
    os._exit(run_as_init(cfg))


if __name__ == "__main__":
    main()
