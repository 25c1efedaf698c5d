"""The `vllm serve` / hf server command lines: pure functions of the config."""

from __future__ import annotations

import os
import stat
import sys
import pytest

from ebft_engine.config import load_config
from ebft_engine.rollout.client import ServerError
from ebft_engine.rollout.vllm_launcher import (
    client_host, hf_serve_argv, lora_rank_flag, resolve_vllm_executable, server_bind_host,
    vllm_env, vllm_serve_argv,
)


def cfg(**over):
    """A real structured config; `trl=` / `vllm=` entries update those sections' keys."""
    trl = dict(num_generations=2, vllm_server_host=None, vllm_server_port=8000, max_completion_length=256)
    vllm = dict(executable="/opt/vllm/bin/vllm", extra_args=None, max_model_len=1024,
                gpu_memory_utilization=0.5, enforce_eager=False, tensor_parallel_size=1, backend="vllm")
    trl.update(over.pop("trl", {}))
    vllm.update(over.pop("vllm", {}))
    base = dict(base_model="Qwen/Qwen3-4B", rl="ebft", datasets=[{"path": "unused.jsonl"}], adapter="lora",
                lora_r=16, seed=42, bf16=True, sequence_len=2048, torch_dtype=None, micro_batch_size=2,
                trl=trl, vllm=vllm)
    base.update(over)
    return load_config(base)


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_vllm_argv_for_a_lora_run():
    argv = vllm_serve_argv(cfg(), "/models/qwen", 8000, "127.0.0.1",
                           executable="/opt/vllm/bin/vllm")
    assert argv[:3] == ["/opt/vllm/bin/vllm", "serve", "/models/qwen"]
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == "8000"
    assert flag(argv, "--served-model-name") == "ebft-base"
    assert flag(argv, "--logprobs-mode") == "processed_logprobs"
    assert flag(argv, "--generation-config") == "vllm"
    assert flag(argv, "--max-model-len") == "1024"
    assert flag(argv, "--gpu-memory-utilization") == "0.5"
    assert flag(argv, "--dtype") == "bfloat16" and flag(argv, "--seed") == "42"
    assert "--enable-lora" in argv and flag(argv, "--max-lora-rank") == "16"
    assert int(flag(argv, "--max-loras")) >= 3
    assert "--enforce-eager" not in argv and "--tensor-parallel-size" not in argv
    assert "--enable-prefix-caching" in argv
    assert all(isinstance(a, str) for a in argv)


def test_vllm_argv_full_finetune_tp_eager_extra():
    c = cfg(adapter=None, vllm=dict(executable=None, extra_args=["--max-num-seqs", "64", "--swap-space", "4"],
                                    max_model_len=None, gpu_memory_utilization=0.9,
                                    enforce_eager=True, tensor_parallel_size=2, backend="vllm"))
    argv = vllm_serve_argv(c, "/m", 9000, "0.0.0.0", executable="vllm")
    assert "--enable-lora" not in argv and "--max-lora-rank" not in argv
    assert flag(argv, "--tensor-parallel-size") == "2" and "--enforce-eager" in argv
    assert argv[-4:] == ["--max-num-seqs", "64", "--swap-space", "4"]
    assert flag(argv, "--max-model-len") == str(2048 + 256)  # sequence_len + max_completion_length
    c = cfg(vllm=dict(extra_args=["--foo", 1]))  # the schema reads numbers as strings
    assert vllm_serve_argv(c, "/m", 9000, executable="vllm")[-2:] == ["--foo", "1"]


def test_launcher_defaults_are_the_schemas():
    """The launcher once had its own defaults (gpu_memory_utilization 0.85, seed 0); the schema's
    (0.9, 42) are the only ones now."""
    c = load_config({"base_model": "Qwen/Qwen3-4B", "rl": "ebft", "datasets": [{"path": "unused.jsonl"}],
                     "trl": {"num_generations": 2, "max_completion_length": 64}, "micro_batch_size": 2})
    argv = vllm_serve_argv(c, "/m", 8000, executable="vllm")
    assert flag(argv, "--gpu-memory-utilization") == "0.9" and flag(argv, "--seed") == "42"
    assert flag(argv, "--max-model-len") == str(1024 + 64)
    assert flag(hf_serve_argv(c, 0, model_path="/m"), "--seed") == "42"


@pytest.mark.parametrize("r,flag_value", [(1, 1), (8, 8), (12, 16), (16, 16), (24, 32),
                                          (64, 64), (300, 320)])
def test_lora_rank_rounds_up_to_a_vllm_value(r, flag_value):
    assert lora_rank_flag(r) == flag_value


def test_lora_rank_too_big():
    with pytest.raises(ValueError, match="max-lora-rank"):
        lora_rank_flag(1024)


def test_vllm_env():
    env = vllm_env("/nonexistent/model", base_env={"PATH": "/bin"})
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert "HF_HUB_OFFLINE" not in env and env["PATH"] == "/bin"
    assert vllm_env(os.getcwd(), base_env={})["HF_HUB_OFFLINE"] == "1"


def test_executable_resolution(tmp_path, monkeypatch):
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("EBFT_VLLM_EXECUTABLE", raising=False)
    none = cfg(vllm=dict(executable=None))
    assert resolve_vllm_executable(none) == str(exe)  # on PATH
    other = tmp_path / "other-vllm"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    assert resolve_vllm_executable(cfg(vllm=dict(executable=str(other)))) == str(other)  # config
    monkeypatch.setenv("EBFT_VLLM_EXECUTABLE", str(exe))
    assert resolve_vllm_executable(cfg(vllm=dict(executable=str(other)))) == str(exe)  # env wins
    monkeypatch.delenv("EBFT_VLLM_EXECUTABLE")
    with pytest.raises(ServerError, match="vllm.executable"):
        resolve_vllm_executable(cfg(vllm=dict(executable=str(tmp_path / "missing"))))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServerError, match="vllm.backend: hf"):
        resolve_vllm_executable(none)


def test_hosts():
    assert server_bind_host(cfg()) == "127.0.0.1"
    wide = cfg(trl=dict(vllm_server_host="0.0.0.0", vllm_server_port=8000))
    assert server_bind_host(wide) == "0.0.0.0" and client_host(wide) == "127.0.0.1"
    other = cfg(trl=dict(vllm_server_host="10.1.2.3", vllm_server_port=8000))
    assert client_host(other) == "10.1.2.3"


def test_hf_argv():
    argv = hf_serve_argv(cfg(), 0, "127.0.0.1", model_path="/m")
    assert argv[:3] == [sys.executable, "-m", "ebft_engine.rollout.hf_server"]
    assert flag(argv, "--model") == "/m" and flag(argv, "--port") == "0"
    assert flag(argv, "--max-model-len") == "1024" and flag(argv, "--max-lora-rank") == "16"
    assert flag(argv, "--dtype") == "bfloat16"
