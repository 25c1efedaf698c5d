"""The pass@1 sandbox: model-written code runs in an OS jail (bubblewrap, else unshare) it cannot leave.

A battery of hostile programs, one per way out: a shell through spawn primitives that raise no
audit event, writes outside the work dir through every file API, processes left running or holding
the output, signals to the evaluator, reading the user's files and the parent's environment, fork
and memory bombs, the network, filling tmpfs, huge output, regaining capabilities. Each runs in
every backend that works here with the audit hook OFF, so the OS layers alone must stop it; then
the whole battery goes through the pass@1 scorer (hook on, in parallel), which must count each one
failed. After each round nothing it started may still run, the evaluator and a process of the
jail's own uid must be alive, and nothing outside the jail may have changed.

Skipped, with the probe's reason, only where no backend works (CI installs bubblewrap).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import string
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebft_engine.sandbox import UNSAFE, SandboxUnavailable, probe, require_backend, run_program, run_programs
from ebft_engine.sandbox.backends import DEFAULT_ORDER, JAIL_UID
from ebft_engine.sandbox.runner import NPROC

WORKING = [name for name in DEFAULT_ORDER if probe(name)[0] is not None]
NO_JAIL_REASON = "; ".join(f"{name}: {probe(name)[1]}" for name in DEFAULT_ORDER)
jailed = pytest.mark.skipif(not WORKING, reason=f"no OS sandbox works here ({NO_JAIL_REASON})")
pytestmark = pytest.mark.sandbox

QUICK_S = 30.0  # programs that fail at once: generous, never reached on a busy machine
KILL_S = 4.0  # programs that must be killed: long enough to have started their children first
SHELL_CMD = "echo SHELL-RAN; echo pwned > $host_dir/from-shell; cat $secret_file"


@dataclass(frozen=True)
class Hostile:
    """One attack. `source` is a string.Template over the World's fields; `errors`: any one of
    these must be in stderr (the OS's own refusal); `stdout`: all of these in stdout."""

    name: str
    source: str
    timeout_s: float = QUICK_S
    status: str = "failed"
    errors: tuple[str, ...] = ()
    stdout: tuple[str, ...] = ()
    bomb: bool = False  # run alone: rounds of parallel jails started by root share uid 65534's NPROC


NOENT = ("No such file or directory",)
CTYPES = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
BATTERY = [
    # a shell through process primitives that raise no audit event
    Hostile("shell via os.posix_spawn", f"""import os
pid = os.posix_spawn("/bin/sh", ["sh", "-c", "{SHELL_CMD}"], {{}})
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "the shell could not reach the host"
""", errors=NOENT, stdout=("SHELL-RAN",)),
    Hostile("shell via fork + os.execv", f"""import os
pid = os.fork()
if pid == 0:
    os.execv("/bin/sh", ["sh", "-c", "{SHELL_CMD}"])
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "the shell could not reach the host"
""", errors=NOENT, stdout=("SHELL-RAN",)),
    Hostile("shell via ctypes libc.system", CTYPES + f"""
assert libc.system(b"{SHELL_CMD}") == 0, "the shell could not reach the host"
""", errors=NOENT, stdout=("SHELL-RAN",)),
    # writes outside the work dir, through every file API
    Hostile("write via open()", 'open("$host_dir/w-open", "w").write("x")\n', errors=NOENT),
    Hostile("write via os.open", 'import os\nos.open("$host_dir/w-os-open", os.O_WRONLY | os.O_CREAT, 0o644)\n',
            errors=NOENT),
    Hostile("write via dir_fd-relative os.open", """import os
here = os.open(".", os.O_RDONLY)
os.open(os.path.relpath("$host_dir/w-dirfd", os.getcwd()), os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=here)
""", errors=NOENT),
    Hostile("write via dir_fd of /", """import os
root = os.open("/", os.O_RDONLY)
os.open("$host_dir/w-rootfd".lstrip("/"), os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=root)
""", errors=NOENT),
    Hostile("write via pathlib", 'from pathlib import Path\nPath("$host_dir/w-pathlib").write_text("x")\n',
            errors=NOENT),
    Hostile("write via shutil.copy", 'import shutil\nshutil.copy("/usr/bin/env", "$host_dir/w-shutil")\n',
            errors=NOENT),
    Hostile("write via os.rename", 'import os\nopen("x", "w").close()\nos.rename("x", "$host_dir/w-rename")\n',
            errors=NOENT + ("Invalid cross-device link",)),
    Hostile("write through a symlink", 'import os\nos.symlink("$host_dir", "link")\nopen("link/w-symlink", "w")\n',
            errors=NOENT),
    Hostile("write via /proc/self/root", 'open("/proc/self/root$host_dir/w-proc-root", "w")\n', errors=NOENT),
    Hostile("write via the harness's /proc/PID/cwd", 'open("/proc/$harness_pid/cwd/w-proc-cwd", "w")\n',
            errors=NOENT),
    Hostile("write via ctypes open(2)", CTYPES + """
fd = libc.open(b"$host_dir/w-ctypes", 0o101, 0o644)  # O_WRONLY | O_CREAT
assert fd >= 0, "open failed: errno %d" % ctypes.get_errno()
""", errors=("open failed: errno 2",)),
    Hostile("write into /usr", 'open("/usr/lib/$marker", "w")\n',
            errors=("Read-only file system", "Permission denied")),
    Hostile("remount /usr writable", CTYPES + """import os
if libc.mount(None, b"/usr", None, 32 | 4096, None) != 0:  # MS_REMOUNT | MS_BIND, without MS_RDONLY
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
open("/usr/lib/$marker", "w")
""", errors=("Operation not permitted", "Permission denied")),
    Hostile("regain capabilities in a nested user namespace and escape the root", CTYPES + """import os
if libc.unshare(0x10000000 | 0x00020000) == 0:  # CLONE_NEWUSER | CLONE_NEWNS: all capabilities, in there
    os.mkdir("d")
    os.chroot("d")  # the classic chroot escape: only a chroot can be left this way, not a pivot_root
    os.chdir("../../../../../../..")
    os.chroot(".")
    libc.mount(None, b"/usr", None, 32 | 4096, None)
    print("escaped into", sorted(os.listdir("/")))
assert os.path.exists("$host_dir"), "still inside the jail"
"""),
    # processes that outlive the program, or hold its output to stretch the timeout
    Hostile("process left running after the program exits", """import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "$sleep_exit"])
    os._exit(0)
os.wait()
print("spawned")
sys.exit(1)  # a wrong answer that leaves a process behind
""", stdout=("spawned",)),
    Hostile("stretch the timeout: a grandchild holds the output, the program never ends", """import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "$sleep_hold"])  # inherits stdout and stderr
    os._exit(0)
os.wait()
print("spawned")
while True:
    time.sleep(1)
""", timeout_s=KILL_S, status="timeout", stdout=("spawned",)),
    Hostile("busy loop", "while True:\n    pass\n", timeout_s=2.0, status="timeout"),
    # signals to the evaluator and to other processes of the jail's own uid
    Hostile("os.kill the evaluator", "import os\nos.kill($harness_pid, 9)\n", errors=("No such process",)),
    Hostile("killpg the evaluator's group", "import os\nos.killpg(os.getpgid($harness_pid), 9)\n",
            errors=("No such process",)),
    Hostile("pidfd_send_signal to a process of the same uid", """import os, signal
signal.pidfd_send_signal(os.pidfd_open($sentinel_pid), signal.SIGKILL)
""", errors=("No such process",)),
    Hostile("kill(-1): every process it may signal", "import os\nos.kill(-1, 9)\n", errors=("No such process",)),
    # the user's files and the parent's environment
    Hostile("read a file the user can read", 'print(open("$secret_file").read())\n', errors=NOENT),
    Hostile("read it via /proc/PID/root", 'print(open("/proc/$harness_pid/root$secret_file").read())\n',
            errors=NOENT),
    Hostile("read /etc/shadow", 'print(open("/etc/shadow").read())\n', errors=NOENT),
    Hostile("read the parent's environment under /proc", """import os
blob = repr(dict(os.environ)).encode()
for pid in ["self", "1", "$harness_pid", str(os.getppid())] + [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        blob += open(f"/proc/{pid}/environ", "rb").read()
    except OSError as error:
        print(pid, error)
print(blob)
assert b"$env_name" in blob, "no secret found"
"""),
    # bombs
    Hostile("fork bomb", "import os\nwhile True:\n    os.fork()\n",
            errors=("Resource temporarily unavailable",), bomb=True),
    Hostile("count forks", """import os, time
n = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    n += 1
print("forked", n)
assert n == 200
""", bomb=True),
    Hostile("memory bomb, at once", "x = bytearray(4 << 30)\n", errors=("MemoryError",)),
    Hostile("memory bomb, in steps", "chunks = [bytearray(64 << 20) for _ in range(64)]\n", errors=("MemoryError",)),
    # the network, including the abstract unix socket namespace
    Hostile("TCP to a listener on the host's 127.0.0.1", """import socket
socket.create_connection(("127.0.0.1", $tcp_port), timeout=5)
""", errors=("Connection refused", "Network is unreachable")),
    Hostile("connect to a host abstract unix socket", """import socket
s = socket.socket(socket.AF_UNIX)
s.connect("\\0$abstract")
""", errors=("Connection refused",)),
    # filling the writable tmpfs (files under the 16 MB file-size limit, so the mount's size cap speaks)
    *[Hostile(f"fill {where}", f"""for i in range(12):
    with open("{where}/fill%d" % i, "wb") as f:
        f.write(bytes(15 << 20))
""", errors=("No space left on device",)) for where in ("/tmp", "/dev/shm", ".")],
    Hostile("one huge file", 'open("big", "wb").write(bytes(100 << 20))\n', errors=("File too large",)),
    Hostile("huge stdout", 'import sys\nwhile True:\n    sys.stdout.write("x" * (1 << 20))\n',
            errors=("File too large",)),
]
LEFT_BEHIND = ("process left running after the program exits",
               "stretch the timeout: a grandchild holds the output, the program never ends")


@dataclass
class World:
    """What lives outside the jail and must stay untouched."""

    host_dir: Path
    secret_file: Path
    secret: str
    env_name: str
    env_secret: str
    marker: str
    sleep_exit: str
    sleep_hold: str
    harness_pid: int
    sentinel: subprocess.Popen
    tcp: socket.socket
    abstract_sock: socket.socket
    abstract: str

    def fields(self) -> dict[str, object]:
        return {"host_dir": self.host_dir, "secret_file": self.secret_file, "env_name": self.env_name,
                "marker": self.marker, "sleep_exit": self.sleep_exit, "sleep_hold": self.sleep_hold,
                "harness_pid": self.harness_pid, "sentinel_pid": self.sentinel.pid,
                "tcp_port": self.tcp.getsockname()[1], "abstract": self.abstract}

    def source(self, hostile: Hostile) -> str:
        return string.Template(hostile.source).substitute(self.fields())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    host_dir = tmp_path_factory.mktemp("outside-the-jail")
    secret = "SECRET-" + secrets.token_hex(8)
    (host_dir / "secret.txt").write_text(secret)
    env_name, env_secret = "EBFT_TEST_PARENT_SECRET", "ENVSECRET-" + secrets.token_hex(8)
    marker = "ebft-hostile-" + secrets.token_hex(6)
    digits = str(secrets.randbelow(10**8)).zfill(8)
    same_uid = {"user": JAIL_UID, "group": JAIL_UID, "extra_groups": []} if os.geteuid() == 0 else {}
    sentinel = subprocess.Popen(["sleep", f"600.{digits}9"], **same_uid)
    tcp = socket.create_server(("127.0.0.1", 0))
    tcp.setblocking(False)
    abstract = marker + "-sock"
    abstract_sock = socket.socket(socket.AF_UNIX)
    abstract_sock.bind("\0" + abstract)
    abstract_sock.listen()
    abstract_sock.setblocking(False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(env_name, env_secret)
        yield World(host_dir, host_dir / "secret.txt", secret, env_name, env_secret, marker,
                    f"900.{digits}1", f"900.{digits}2", os.getpid(), sentinel, tcp, abstract_sock, abstract)
    sentinel.kill()
    sentinel.wait()
    tcp.close()
    abstract_sock.close()


def leftovers(*tokens: str) -> list[str]:
    """Command lines of live processes that contain any token (zombies have none and are skipped)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if any(t.encode() in cmdline for t in tokens):
            found.append(f"{pid}: {cmdline[:60]!r}...{cmdline[-120:]!r}")
    return found


def escapes(world: World, results: dict) -> list[str]:
    """Everything a round changed outside the jail (checked the moment its last program returned)."""
    found = []
    if sorted(p.name for p in world.host_dir.iterdir()) != ["secret.txt"]:
        found.append(f"files written outside: {sorted(p.name for p in world.host_dir.iterdir())}")
    if world.secret_file.read_text() != world.secret:
        found.append("the secret file was changed")
    if Path("/usr/lib", world.marker).exists():
        found.append("a file appeared in the host's /usr/lib")
    for name, res in results.items():
        for secret in (world.secret, world.env_secret):
            if secret in res.stdout or secret in res.stderr:
                found.append(f"{name!r} read {secret}")
    for server in (world.tcp, world.abstract_sock):
        try:
            server.accept()
            found.append(f"a connection reached {server}")
        except BlockingIOError:
            pass
    if world.sentinel.poll() is not None:
        found.append("a process of the jail's uid was killed")
    found += [f"still running: {p}" for p in leftovers(world.marker, world.sleep_exit, world.sleep_hold)]
    return found


def run_battery(world: World, backend, audit_hook: bool) -> dict:
    """Every hostile program in `backend`, in parallel (the bombs after, on their own)."""
    def one(h: Hostile):
        return h.name, run_program(world.source(h), backend=backend, timeout_s=h.timeout_s,
                                   audit_hook=audit_hook, label=f"{world.marker}:{h.name}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(pool.map(one, [h for h in BATTERY if not h.bomb]))
    results.update(one(h) for h in BATTERY if h.bomb)
    return results


@pytest.fixture(scope="module", params=WORKING or ["none"])
def os_layer_round(request, world):
    """The battery with the audit hook off, once per working backend: (backend, results, escapes)."""
    if not WORKING:
        pytest.skip(f"no OS sandbox works here ({NO_JAIL_REASON})")
    results = run_battery(world, probe(request.param)[0], audit_hook=False)
    return request.param, results, escapes(world, results)


@jailed
def test_nothing_escapes_the_os_layers(os_layer_round):
    """No file, secret, connection, killed process or survivor: the evaluator's world is intact."""
    _, _, found = os_layer_round
    assert found == []


@jailed
@pytest.mark.parametrize("hostile", BATTERY, ids=[h.name for h in BATTERY])
def test_os_layers_alone_contain_each_hostile_program(os_layer_round, hostile):
    backend, results, _ = os_layer_round
    res = results[hostile.name]
    assert res.backend == backend and not res.passed and res.status == hostile.status, (res.status, res.stderr)
    if hostile.errors:
        assert any(e in res.stderr for e in hostile.errors), res.stderr[-1500:]
    for text in hostile.stdout:
        assert text in res.stdout, (res.stdout, res.stderr[-1500:])


@jailed
def test_forks_stop_at_the_process_limit(os_layer_round):
    _, results, _ = os_layer_round
    forked = re.search(r"forked (\d+)", results["count forks"].stdout)
    assert forked and 0 < int(forked.group(1)) < NPROC, results["count forks"].stdout


@jailed
def test_output_is_capped(os_layer_round):
    _, results, _ = os_layer_round
    res = results["huge stdout"]
    assert 0 < len(res.stdout) <= 20_000 and set(res.stdout) == {"x"}


@jailed
def test_the_scorer_counts_every_hostile_program_failed(world):
    """The pass@1 path (audit hook on, programs in parallel): hostile programs score 0, a right one 1."""
    from ebft_engine.sandbox import humaneval_program

    good = humaneval_program('def add(a, b):\n    """Add."""\n', "    return a + b\n",
                             "def check(candidate):\n    assert candidate(2, 3) == 5\n", "add")
    programs = [good] + [world.source(h) for h in BATTERY]
    labels = [f"{world.marker}:good"] + [f"{world.marker}:{h.name}" for h in BATTERY]
    outcomes = run_programs(programs, backend=require_backend(), timeout_s=6.0, labels=labels)
    assert outcomes[0].passed, outcomes[0].stderr
    failed = {h.name: not res.passed for h, res in zip(BATTERY, outcomes[1:])}
    found = escapes(world, dict(zip(labels, outcomes)))
    assert all(failed.values()), [name for name, ok in failed.items() if not ok]
    assert found == []


@jailed
@pytest.mark.parametrize("name", WORKING or ["none"])
def test_the_jail_dies_with_its_evaluator(name):
    """An evaluator SIGKILLed mid-run takes its jail with it (bwrap and unshare die with their parent)."""
    digits = str(secrets.randbelow(10**8)).zfill(8)
    sleeper = f"700.{digits}"  # the evaluator's own command line holds only the digits, not this
    harness = """
import sys
sys.path.insert(0, sys.argv[1])
from ebft_engine.sandbox import probe, run_program
program = "import os\\nos.execv('/bin/sleep', ['sleep', '700.%s'])" % sys.argv[3]
run_program(program, backend=probe(sys.argv[2])[0], timeout_s=300, audit_hook=False)
"""
    proc = subprocess.Popen([os.path.realpath(os.sys.executable), "-c", harness,
                             str(Path(__file__).resolve().parents[1]), name, digits])
    try:
        deadline = time.monotonic() + 60
        while not leftovers(sleeper) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers(sleeper), f"the jailed sleeper never started (evaluator exit code {proc.poll()})"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60  # a hang guard: it returns as soon as the sleeper is gone
    while leftovers(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(sleeper) == [], "the jail outlived its evaluator"


@jailed
def test_right_and_wrong_programs_and_the_work_dir():
    ok = run_program("assert sum(range(4)) == 6\nopen('scratch', 'w').write('ok')\nprint(open('scratch').read())\n")
    assert ok.passed and ok.status == "passed" and ok.stdout == "ok\n" and ok.backend in DEFAULT_ORDER
    bad = run_program("assert 1 + 1 == 3\n")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr


@jailed
def test_the_audit_hook_is_still_a_second_layer():
    res = run_program("import subprocess\nsubprocess.run(['true'])\n")
    assert not res.passed and "sandbox: subprocess.Popen is not allowed" in res.stderr


# --- no OS sandbox: refused unless the user opts out --------------------------------------------------------------


def test_no_backend_refuses_and_says_how_to_get_one(monkeypatch):
    monkeypatch.setenv("EBFT_SANDBOX_BACKENDS", "none")  # as if neither bwrap nor unshare worked
    with pytest.raises(SandboxUnavailable) as refused:
        require_backend()
    message = str(refused.value)
    assert "apt-get install bubblewrap" in message and "user namespaces" in message and "--unsafe-exec" in message
    with pytest.raises(SandboxUnavailable):
        run_program("print('never runs')\n")
    assert require_backend(unsafe_exec=True) is UNSAFE


def test_a_backend_that_does_not_exist_is_named_in_the_refusal(monkeypatch):
    monkeypatch.setenv("EBFT_SANDBOX_BACKENDS", "firejail")
    with pytest.raises(SandboxUnavailable, match="firejail: unknown sandbox backend"):
        require_backend()


def test_unsafe_exec_still_applies_rlimits_and_the_timeout():
    ok = run_program("print('hi')\n", backend=UNSAFE)
    assert ok.passed and ok.stdout == "hi\n" and ok.backend == "unsafe"
    memory = run_program("x = bytearray(4 << 30)\n", backend=UNSAFE, memory_mb=256)
    assert not memory.passed and "MemoryError" in memory.stderr
    hung = run_program("import time\ntime.sleep(1000)\n", backend=UNSAFE, timeout_s=1.5)
    assert hung.status == "timeout" and not hung.passed
    hooked = run_program("import socket\nsocket.socket()\n", backend=UNSAFE)
    assert not hooked.passed and "sandbox: socket.__new__ is not allowed" in hooked.stderr
