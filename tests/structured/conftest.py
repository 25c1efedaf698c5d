"""Fixtures for structured mode: a tiny model folder and our hf server in a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from tinymodel import save_tiny_model_dir  # noqa: E402


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for_line(log_path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 90.0):
    """Block until `pattern` appears in the log (returns the match) or the process exits."""
    rx = re.compile(pattern)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        m = rx.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"{pattern!r} not in {log_path} after {timeout}s")


def start_hf_server(model_dir: Path, log_path: Path, *extra: str):
    """Our hf server on 127.0.0.1, port 0; returns (proc, base_url) once it listens."""
    from ebft_engine.rollout.vllm_launcher import spawn_server

    argv = [sys.executable, "-m", "ebft_engine.rollout.hf_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", "0", "--threads", "1", *extra]
    proc = spawn_server(argv, child_env(), log_path, cwd=str(REPO))
    m = wait_for_line(log_path, r"listening on http://127\.0\.0\.1:(\d+)", proc)
    return proc, f"http://127.0.0.1:{m.group(1)}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def hf_server(tiny_model_dir, tmp_path_factory):
    """(base_url, log_path) of a running hf server on the tiny model; stopped after the module."""
    from ebft_engine.rollout.vllm_launcher import stop_server

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc, url = start_hf_server(tiny_model_dir, log_path)
    yield url, log_path
    stop_server(proc, grace_s=5)


def start_fake(tmp_path: Path, mode: str, *extra: str):
    """tests/structured/fake_server.py in `mode`; returns (proc, url, record path, log path)."""
    from ebft_engine.rollout.vllm_launcher import spawn_server

    port_file = tmp_path / f"port-{mode}"
    record = tmp_path / f"requests-{mode}.jsonl"
    log = tmp_path / f"fake-{mode}.log"
    proc = spawn_server([sys.executable, str(HERE / "fake_server.py"), "--mode", mode,
                         "--port-file", str(port_file), "--record", str(record), *extra],
                        child_env(), log)
    deadline = time.monotonic() + 50  # a hang guard (the fake server starts in well under 1 s)
    while not port_file.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"the fake server wrote no port file; see {log}"
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text()}", record, log


def records(path: Path) -> list[dict]:
    """The request bodies a fake server recorded."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


