"""Failure paths of the client and launcher: every one is a clear error naming its cause, never a hang
(the per-test timeout is the bound; the messages show which path ended each wait)."""

from __future__ import annotations

import sys
import time

import pytest

from conftest import child_env, records, start_fake
from ebft_engine.rollout.client import GenerationClient, MalformedReplyError, ServerError, Timeouts
from ebft_engine.rollout.vllm_launcher import free_port, spawn_server, stop_server, wait_healthy

pytestmark = pytest.mark.timeout(60)


def fast_client(url: str, **kw) -> GenerationClient:
    return GenerationClient(url, retries=kw.pop("retries", 2), backoff_s=0.05, **kw)


def test_unreachable_server_is_a_clear_error(tmp_path):
    port = free_port()
    client = fast_client(f"http://127.0.0.1:{port}", log_path=str(tmp_path / "server.log"))
    with pytest.raises(ServerError) as e:
        client.completions([[1, 2, 3]], n=2, max_tokens=4)
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "vllm_server_port" in msg and "server.log" in msg
    with pytest.raises(ServerError, match=f"127.0.0.1:{port}.*did not become healthy within 1s"):
        client.wait_for_health(timeout=1.0)


def test_server_dying_mid_request(tmp_path):
    proc, url, _, log = start_fake(tmp_path, "die")
    try:
        client = fast_client(url, log_path=str(log))
        assert client.health()
        with pytest.raises(ServerError) as e:
            client.completions([[1, 2, 3]], n=2, max_tokens=4)
        assert url.split("//")[1] in str(e.value)
        assert proc.wait(5) == 3
    finally:
        stop_server(proc, grace_s=2)


def test_malformed_reply(tmp_path):
    proc, url, _, _ = start_fake(tmp_path, "malformed")
    try:
        with pytest.raises(MalformedReplyError, match="2 log-probs for 3 token ids"):
            fast_client(url).completions([[1, 2, 3]], n=1, max_tokens=4)
    finally:
        stop_server(proc, grace_s=2)


def test_500_is_retried_once_then_quoted(tmp_path):
    proc, url, record, _ = start_fake(tmp_path, "error500")
    try:
        with pytest.raises(ServerError, match="engine exploded"):
            fast_client(url).completions([[1, 2, 3]], n=1, max_tokens=4)
        assert len([r for r in records(record) if r["path"] == "/v1/completions"]) == 2
    finally:
        stop_server(proc, grace_s=2)


def test_hanging_server_times_out(tmp_path):
    proc, url, _, _ = start_fake(tmp_path, "hang")
    try:
        client = fast_client(url, timeouts=Timeouts(read_base=1.0, read_per_token=0.0))
        with pytest.raises(ServerError, match="no answer"):  # the 1 s read timeout, not a hang
            client.completions([[1, 2, 3]], n=1, max_tokens=4)
    finally:
        stop_server(proc, grace_s=2)


def test_wait_healthy_fails_fast_when_the_process_exits(tmp_path):
    log = tmp_path / "server.log"
    proc = spawn_server([sys.executable, "-c", "import sys; print('CUDA out of memory (fake)'); "
                         "sys.exit(2)"], child_env(), log)
    with pytest.raises(ServerError) as e:  # the process's exit ends the wait, not the 600 s limit
        wait_healthy(f"http://127.0.0.1:{free_port()}", proc, timeout=600, log_path=log)
    assert "exited with code 2" in str(e.value) and "CUDA out of memory (fake)" in str(e.value)


def test_stop_server_kills_the_process_group(tmp_path):
    """A server's own children (vLLM's EngineCore) must not outlive it."""
    import psutil

    log, pid_file = tmp_path / "server.log", tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    proc = spawn_server([sys.executable, "-c", code], child_env(), log)
    deadline = time.monotonic() + 50  # a hang guard, inside the test's 60 s
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the server never started its child"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    stop_server(proc, grace_s=5)
    # the child dies with the group (it sleeps, SIGTERM ends it): gone, or a zombie awaiting reaping
    def dead(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 30  # a hang guard: it returns as soon as the child is dead
    while not dead(child):
        assert time.monotonic() < deadline, "the server's child outlived it"
        time.sleep(0.05)
