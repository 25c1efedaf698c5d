"""Start a generation server as a child process: the argv (vLLM or ours), spawn, health, stop.

`vllm serve` runs from its own environment (vLLM pins torch and caps transformers, so it cannot
share ours); we only build its command line and talk HTTP to it (vllm-integration.md §7(a)). The
argv builders are pure functions of the config so they are unit-tested on machines without vLLM.
Children get their own session (so stopping kills the whole process group, no EngineCore orphans),
no stdin and no shell; their output goes to a log file whose tail every error quotes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ebft_engine.config import LOOPBACK, EbftConfig
from ebft_engine.rollout.client import GenerationClient, ServerError, _log_tail
from ebft_engine.rollout.protocol import BASE_MODEL_NAME

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""`--max-lora-rank` must be one of these (vllm/config/lora.py)."""
DEFAULT_MAX_LORAS = 4
"""Adapters resident at once: the current policy, the previous one still used by an in-flight
async batch, and slack for the unload that follows a load."""
ALL_INTERFACES = ("0.0.0.0", "::", "[::]")


def server_bind_host(cfg: EbftConfig) -> str:
    """Where the server listens: `trl.vllm_server_host`, else loopback (decisions.md §12)."""
    return cfg.server_host


def client_host(cfg: EbftConfig) -> str:
    """Where the trainer connects: loopback when the server listens on all interfaces."""
    return cfg.client_host


def server_port(cfg: EbftConfig) -> int:
    return cfg.trl.vllm_server_port


def base_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{int(port)}"


def lora_rank_flag(r: int) -> int:
    """Smallest vLLM-accepted `--max-lora-rank` >= r."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"lora_r={r} is above vLLM's largest --max-lora-rank "
                     f"({VLLM_LORA_RANKS[-1]})")


def uses_lora(cfg: EbftConfig) -> bool:
    return cfg.adapter == "lora"


def max_model_len(cfg: EbftConfig) -> int:
    """`vllm.max_model_len`, else sequence_len + max_completion_length (the config's default)."""
    if cfg.vllm.max_model_len:
        return cfg.vllm.max_model_len
    if cfg.trl.max_completion_length is None:  # only strided configs lack it, and they need no server
        raise ServerError("trl.max_completion_length is unset: a generation server serves structured "
                          "mode (ebft.mode: structured), which requires it")
    return cfg.sequence_len + cfg.trl.max_completion_length


def serve_dtype(cfg: EbftConfig) -> str:
    """vLLM's `--dtype`: `torch_dtype` when set, bfloat16 / float16 for `bf16: true` / `fp16: true`,
    else auto."""
    if cfg.torch_dtype and cfg.torch_dtype != "auto":
        return cfg.torch_dtype
    if cfg.bf16 is True:
        return "bfloat16"
    if cfg.fp16:
        return "float16"
    return "auto"


def resolve_vllm_executable(cfg: EbftConfig) -> str:
    """$EBFT_VLLM_EXECUTABLE, else `vllm.executable`, else `vllm` on PATH; a clear error if none.

    (The environment wins, as documented for `vllm.executable`: a machine's own vLLM location
    beats the one written into a shared config.)"""
    for candidate, source in ((os.environ.get("EBFT_VLLM_EXECUTABLE"), "EBFT_VLLM_EXECUTABLE"),
                              (cfg.vllm.executable, "vllm.executable")):
        if candidate:
            path = shutil.which(str(candidate)) or (str(candidate) if Path(candidate).is_file()
                                                      else None)
            if path is None:
                raise ServerError(f"{source} = {candidate!r} is not an executable file. Point it at "
                                  "the `vllm` binary of the environment vLLM is installed in "
                                  "(e.g. /opt/vllm-venv/bin/vllm).")
            return path
    found = shutil.which("vllm")
    if found:
        return found
    raise ServerError("vLLM is not installed here: no `vllm` on PATH, no vllm.executable in the "
                      "config, no EBFT_VLLM_EXECUTABLE. Install vLLM in its own environment "
                      "(it pins its own torch) and point vllm.executable at its `vllm` binary, or "
                      "use our transformers server with `vllm.backend: hf` (slower, no GPU needed).")


def vllm_serve_argv(cfg: EbftConfig, model_path: str, port: int, host: str = LOOPBACK,
                    executable: str | None = None) -> list[str]:
    """The `vllm serve` command line for a config (no shell; one list element per argument)."""
    exe = executable or resolve_vllm_executable(cfg)
    argv = [exe, "serve", str(model_path), "--host", host, "--port", str(int(port)),
            "--served-model-name", BASE_MODEL_NAME, "--dtype", serve_dtype(cfg),
            "--max-model-len", str(max_model_len(cfg)),
            "--gpu-memory-utilization", str(cfg.vllm.gpu_memory_utilization),
            "--seed", str(cfg.seed),
            "--enable-prefix-caching", "--generation-config", "vllm",
            "--logprobs-mode", "processed_logprobs", "--api-server-count", "1"]
    if uses_lora(cfg):
        argv += ["--enable-lora", "--max-lora-rank", str(lora_rank_flag(cfg.lora_r)),
                 "--max-loras", str(DEFAULT_MAX_LORAS)]
    if cfg.vllm.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(cfg.vllm.tensor_parallel_size)]
    if cfg.vllm.enforce_eager:
        argv.append("--enforce-eager")
    return argv + list(cfg.vllm.extra_args)


def vllm_env(model_path: str, base_env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base_env is None else base_env)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    if Path(str(model_path)).is_dir():
        env["HF_HUB_OFFLINE"] = "1"
    return env


def hf_serve_argv(cfg: EbftConfig, port: int, host: str = LOOPBACK, model_path: str | None = None,
                  python: str | None = None) -> list[str]:
    """Our transformers server for a config (`vllm.backend: hf`)."""
    gguf_file = None
    if model_path is None:
        model_path, gguf_file = resolve_model_source(cfg)
    argv = [python or sys.executable, "-m", "ebft_engine.rollout.hf_server", "--model",
            str(model_path), "--host", host, "--port", str(int(port)),
            "--served-model-name", BASE_MODEL_NAME, "--max-model-len", str(max_model_len(cfg)),
            "--seed", str(cfg.seed), "--device", "auto",
            "--dtype", hf_dtype(cfg)]
    if gguf_file:
        argv += ["--gguf-file", gguf_file]
    if uses_lora(cfg):
        argv += ["--max-lora-rank", str(lora_rank_flag(cfg.lora_r))]
    return argv


def hf_dtype(cfg: EbftConfig) -> str:
    """Our server's dtype: the one the trainer picks for this config (so the importance weights
    compare like with like): `torch_dtype`, else `bf16`/`fp16` as modeling resolves them."""
    from ebft_engine import modeling

    device = modeling.resolve_device(cfg.device)
    return modeling.dtype_name(modeling.config_dtype(cfg, device))


def resolve_model_source(cfg: EbftConfig) -> tuple[str, str | None]:
    """(local folder or hub id, GGUF file name or None) for `base_model`, via modeling.py."""
    from ebft_engine import modeling

    return modeling.resolve_model_path(cfg.base_model, dtype=hf_dtype(cfg))


def vllm_model_arg(cfg: EbftConfig) -> str:
    """What `vllm serve` gets as its model: a folder or hub id (a GGUF file is refused)."""
    path, gguf_file = resolve_model_source(cfg)
    if gguf_file:
        raise ServerError(f"base_model {cfg.base_model!r} is a GGUF file; `vllm serve` "
                          "needs a transformers folder or hub id. Convert it to a folder first, or "
                          "use `vllm.backend: hf`.")
    return str(path)


# ------------------------------------------------------------------------------------------------
# Process management


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (racy by nature: `start_server` retries on a clash)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn_server(argv: Sequence[str], env: dict[str, str] | None, log_path: str | os.PathLike,
                 cwd: str | None = None) -> subprocess.Popen:
    """Start the server in its own session, stdout+stderr appended to `log_path`, no stdin."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(list(argv), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 600.0,
                 log_path: str | os.PathLike | None = None) -> float:
    """Poll `GET /health` until it answers 200; fail fast when `proc` exits. Returns seconds."""
    client = GenerationClient(url, log_path=str(log_path) if log_path else None)
    try:
        return client.wait_for_health(timeout=timeout, proc=proc)
    finally:
        client.close()


def stop_server(proc: subprocess.Popen | None, grace_s: float = 15.0) -> int | None:
    """SIGTERM the server's process group, SIGKILL it after `grace_s`. Returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait(5)
    else:  # the leader is gone; make sure no child of its group lingers
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return proc.returncode


def start_server(argv_for_port, log_path: str | os.PathLike, *, env: dict[str, str] | None = None,
                 host: str = LOOPBACK, port: int | None = None, timeout: float = 600.0,
                 tries: int = 3) -> tuple[subprocess.Popen, str]:
    """Spawn `argv_for_port(port)` and wait until healthy; on a port clash, retry on a new port.

    Returns (process, base URL). A fixed `port` is tried once."""
    last: Exception | None = None
    for _ in range(1 if port else tries):
        p = port or free_port(host)
        proc = spawn_server(argv_for_port(p), env, log_path)
        url = base_url(LOOPBACK if host in ALL_INTERFACES else host, p)
        try:
            wait_healthy(url, proc, timeout, log_path)
            return proc, url
        except ServerError as e:
            stop_server(proc)
            last = e
            if "address already in use" not in _log_tail(str(log_path), 40).lower():
                raise
        time.sleep(0.5)
    raise ServerError(f"could not start the generation server: every port tried was in use. "
                      f"{last}")
