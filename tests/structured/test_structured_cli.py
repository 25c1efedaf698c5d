"""`python -m ebft_engine serve` and `train` as the launcher runs them: real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO, child_env, wait_for_line
from ebft_engine.rollout.vllm_launcher import free_port, stop_server

pytestmark = pytest.mark.timeout(300)


def write_config(tmp_path: Path, model_dir: Path, **over) -> Path:
    raw = {"base_model": str(model_dir), "rl": "ebft", "device": "cpu",
           "ebft": {"mode": "structured"},
           "trl": {"num_generations": 2, "max_completion_length": 8, "vllm_server_port": 0,
                   "vllm_lora_sync": True, "vllm_server_timeout": 2},
           "vllm": {"backend": "hf"}, "datasets": [{"path": str(tmp_path / "data.jsonl")}],
           "adapter": "lora", "lora_r": 8, "micro_batch_size": 2, "max_steps": 1,
           "output_dir": str(tmp_path / "run"), "bf16": False, "sequence_len": 64}
    for key, value in over.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi", "ground_truth": "yo"}\n')
    return path


def engine(*args: str) -> list[str]:
    return [sys.executable, "-m", "ebft_engine", *args]


def test_serve_hf_backend(tiny_model_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_model_dir)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(engine("serve", str(cfg), "--port", "0"), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO),
                                env=child_env(), start_new_session=True)
    try:
        m = wait_for_line(log, r"listening on http://127\.0\.0\.1:(\d+)", proc)
        url = f"http://127.0.0.1:{m.group(1)}"
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == "ebft-base" and models[0]["max_model_len"] == 64 + 8
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(20) is not None
    finally:
        stop_server(proc, grace_s=2)


def fake_vllm(tmp_path: Path) -> Path:
    exe = tmp_path / "vllm"
    exe.write_text(f"#!{sys.executable}\nimport sys, time\n"
                   f"open({str(tmp_path / 'argv.txt')!r}, 'w').write('\\n'.join(sys.argv[1:]))\n"
                   "time.sleep(60)\n")
    exe.chmod(0o755)
    return exe


def test_serve_vllm_backend_argv_and_signal_forwarding(tiny_model_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_model_dir, vllm={"backend": "vllm"},
                       trl={"vllm_server_host": "0.0.0.0", "vllm_server_port": 8123})
    env = {**child_env(), "EBFT_VLLM_EXECUTABLE": str(fake_vllm(tmp_path))}
    shown = subprocess.run(engine("serve", str(cfg), "--print-argv"), capture_output=True,
                           text=True, cwd=str(REPO), env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"serve {tiny_model_dir} --host 0.0.0.0 --port 8123" in shown.stdout
    assert "--logprobs-mode processed_logprobs" in shown.stdout
    assert "reachable from the network" in shown.stderr

    proc = subprocess.Popen(engine("serve", str(cfg), "--host", "127.0.0.1"), cwd=str(REPO),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        argv_file = tmp_path / "argv.txt"
        deadline = time.monotonic() + 240  # a hang guard: starting torch is slow on a busy machine
        while not argv_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the fake vLLM was never started"
            time.sleep(0.1)
        argv = argv_file.read_text().splitlines()
        assert argv[:2] == ["serve", str(tiny_model_dir)]
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) != 0  # vLLM was ended by the forwarded signal
    finally:
        stop_server(proc, grace_s=2)


def test_train_without_a_server_exits_nonzero_with_a_clear_error(tiny_model_dir, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, tiny_model_dir, trl={"vllm_server_port": port})
    done = subprocess.run(engine("train", str(cfg)), capture_output=True, text=True,
                          cwd=str(REPO), env=child_env(), timeout=240)
    assert done.returncode != 0
    assert f"127.0.0.1:{port}" in done.stderr and "did not become healthy within 2s" in done.stderr
    assert "Traceback" not in done.stderr  # the user's to fix (start the server): no traceback
