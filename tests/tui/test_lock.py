"""One launcher per run dir: the lock file, its staleness rules, and two real launchers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakes.helpers import kill_quietly, wait_dead, wait_for_file  # noqa: E402

from ebft_tui.runs import lock  # noqa: E402

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def test_second_acquire_is_refused_naming_the_holder(tmp_path):
    held = lock.acquire(tmp_path, command="ebft run x")
    assert held.pid == os.getpid() and held.host == socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(lock.RunDirLocked) as ei:
            lock.acquire(tmp_path, pid=sleeper.pid)
        msg = str(ei.value)
        assert f"pid {os.getpid()}" in msg and "ebft run x" in msg and "ebft watch" in msg
        assert lock.live_holder(tmp_path).pid == os.getpid()
        assert lock.acquire(tmp_path).pid == os.getpid()  # the holder itself may re-take it
        assert not lock.release(tmp_path, pid=sleeper.pid)  # not its lock
        assert lock.release(tmp_path)
        assert lock.acquire(tmp_path, pid=sleeper.pid).pid == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_holder_or_a_reused_pid_is_stale(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.acquire(tmp_path, pid=dead.pid)
    assert lock.live_holder(tmp_path) is None  # its pid is gone
    assert lock.acquire(tmp_path).pid == os.getpid()
    lock.release(tmp_path)
    # A live pid that started after the lock was taken is not the holder (pid reuse).
    me = psutil.Process(os.getpid()).create_time()
    lock.lock_path(tmp_path).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                    "started_at": me - 3600, "pid_started_at": me - 3600}))
    assert lock.live_holder(tmp_path) is None
    assert lock.acquire(tmp_path).pid == os.getpid()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    lock.lock_path(tmp_path).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started_at": time.time()}))
    with pytest.raises(lock.RunDirLocked) as ei:
        lock.acquire(tmp_path)
    assert "elsewhere" in str(ei.value) and "remove" in str(ei.value)


HEADLESS = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from fakes.helpers import fake_plan
from ebft_tui.headless import run_headless
from ebft_tui.runs.lock import RunDirLocked
rd = Path({run_dir!r})
plan = fake_plan(rd, ("--steps", "1", "--hang", "--graceful", "--report", str(rd / sys.argv[1])))
try:
    sys.exit(run_headless(plan))
except RunDirLocked as e:
    print("REFUSED:", e, flush=True)
    sys.exit(2)
"""


def test_two_headless_launchers_on_one_run_dir(tmp_path):
    """The second launcher is refused before it writes anything, and the first run is untouched."""
    script = tmp_path / "launch.py"
    script.write_text(HEADLESS.format(tests=str(REPO / "tests"), run_dir=str(tmp_path / "run")))
    first = subprocess.Popen([sys.executable, str(script), "a.json"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        info = wait_for_file(tmp_path / "run" / "a.json")
        pids.append(info["pid"])
        state_before = (tmp_path / "run" / "state.json").read_text()
        second = subprocess.run([sys.executable, str(script), "b.json"], cwd=REPO, capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "REFUSED" in second.stdout and f"pid {first.pid}" in second.stdout
        assert not (tmp_path / "run" / "b.json").exists()  # no second trainer
        assert json.loads((tmp_path / "run" / "state.json").read_text())["launcher_pid"] == first.pid
        assert json.loads(state_before)["launcher_pid"] == first.pid
        first.send_signal(2)  # Ctrl+C: graceful stop, then the lock goes
        first.communicate(timeout=60)
        assert not lock.lock_path(tmp_path / "run").exists()
    finally:
        first.kill()
        kill_quietly(pids)
    assert wait_dead(pids, 5) == []
