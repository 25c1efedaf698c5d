"""Children of the engine die with it at once (issue 12 §4): `lifeline.spawn` sets PR_SET_PDEATHSIG
without preexec_fn, from a thread that outlives the child; `ebft serve` with the vllm backend
takes vLLM down when it is SIGKILLed, and reports a signal as 128+N."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1"}


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_until(condition, what: str, limit: float = 60.0) -> None:
    """A hang guard, not a speed test: the watchdog's grace alone is 60 s, PDEATHSIG is immediate."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def read_pid(path: Path, proc: subprocess.Popen) -> int:
    wait_until(lambda: path.exists() and path.read_text().strip() or proc.poll() is not None,
               f"{path} never written")
    assert proc.poll() is None, proc.communicate()
    return int(path.read_text())


PARENT = textwrap.dedent("""
    import sys, threading, time
    from ebft_engine import lifeline
    out = sys.argv[1]
    box = {}
    worker = threading.Thread(target=lambda: box.update(p=lifeline.spawn(["sleep", "300"])))
    worker.start(); worker.join()          # the thread that asked for the child is gone now
    time.sleep(0.5)
    open(out + ".tmp", "w").write(str(box["p"].pid))
    __import__("os").replace(out + ".tmp", out)
    time.sleep(300)
""")


def test_a_child_outlives_the_thread_that_spawned_it_but_not_its_process(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pid_file)], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        child = read_pid(pid_file, parent)
        assert alive(child)  # the spawning thread ended: the child must not have died with it
        assert Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"  # exec'd
        parent.kill()
        parent.wait(30)
        wait_until(lambda: not alive(child), "the child outlived its SIGKILLed parent")
    finally:
        parent.kill()
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass


def test_spawn_reports_a_missing_program_like_popen():
    from ebft_engine import lifeline

    with pytest.raises(FileNotFoundError):
        lifeline.spawn(["ebft-no-such-program-here"])
    assert lifeline.exit_code(-15) == 143 and lifeline.exit_code(3) == 3


def fake_vllm(tmp_path: Path) -> Path:
    exe = tmp_path / "vllm"
    exe.write_text(f"#!{sys.executable}\nimport os, time\n"
                   f"open({str(tmp_path / 'vllm.pid')!r}, 'w').write(str(os.getpid()))\n"
                   "time.sleep(300)\n")
    exe.chmod(0o755)
    return exe


def serve_vllm(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """`ebft serve` (vllm backend, a fake vllm that sleeps); returns it and the fake's pid."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "base_model": str(tmp_path / "model"), "rl": "ebft", "device": "cpu",
        "trl": {"num_generations": 2, "max_completion_length": 8}, "vllm": {"backend": "vllm"},
        "datasets": [{"path": "unused/d.jsonl"}], "micro_batch_size": 2,
        "output_dir": str(tmp_path / "run"), "sequence_len": 64}))
    proc = subprocess.Popen([sys.executable, "-m", "ebft_engine", "serve", str(cfg), "--port", "0"],
                            env={**env(), "EBFT_VLLM_EXECUTABLE": str(fake_vllm(tmp_path))},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(REPO))
    return proc, read_pid(tmp_path / "vllm.pid", proc)


def test_vllm_dies_at_once_when_ebft_serve_is_killed(tmp_path):
    proc, vllm = serve_vllm(tmp_path)
    try:
        proc.kill()  # no handler of ours runs: only the kernel can tell vLLM
        proc.wait(30)
        wait_until(lambda: not alive(vllm), "vllm outlived `ebft serve`")
    finally:
        proc.kill()
        if alive(vllm):
            os.kill(vllm, signal.SIGKILL)


@pytest.mark.parametrize("target, sig, code", [("serve", signal.SIGTERM, 143), ("serve", signal.SIGINT, 130),
                                               ("vllm", signal.SIGKILL, 137)])
def test_ebft_serve_exits_128_plus_the_signal(tmp_path, target, sig, code):
    proc, vllm = serve_vllm(tmp_path)
    try:
        os.kill(proc.pid if target == "serve" else vllm, sig)
        assert proc.wait(60) == code, proc.communicate()[0]
        wait_until(lambda: not alive(vllm), "vllm outlived `ebft serve`")
    finally:
        proc.kill()
        if alive(vllm):
            os.kill(vllm, signal.SIGKILL)
