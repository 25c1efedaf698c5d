"""The trainer's side of the generation server: where it is, waiting for it, checking that it
fits this run, and how trained weights reach it (vllm-integration.md §7).

The server is started separately (`ebft serve`, or by `ebft run`); the trainer finds it at
$EBFT_SERVER_URL or `trl.vllm_server_host`/`trl.vllm_server_port`, waits for `GET /health`, and
refuses one whose log-probs or LoRA limits do not fit this run.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebft_engine.config import EbftConfig
from ebft_engine.structured.groups import StructuredError


@dataclass
class Server:
    """A healthy generation server: the client, the served base model's name, its context size."""

    client: Any
    base_name: str
    max_model_len: int


def server_url(cfg: EbftConfig) -> str:
    """$EBFT_SERVER_URL (set by `ebft run`), else the config's host and port."""
    from ebft_engine.rollout import vllm_launcher as launcher

    url = os.environ.get("EBFT_SERVER_URL")
    if url:
        return url
    port = launcher.server_port(cfg)
    if port == 0:
        raise StructuredError(
            "trl.vllm_server_port is 0 (any free port): the trainer cannot guess which port "
            "the server took. Start both with `ebft run` (it passes the port), or set "
            "trl.vllm_server_port to the port `ebft serve` printed, or EBFT_SERVER_URL.")
    return launcher.base_url(launcher.client_host(cfg), port)


def connect(cfg: EbftConfig, client: Any = None) -> Server:
    """Wait for the server (up to `trl.vllm_server_timeout`) and read what it serves."""
    from ebft_engine.rollout import vllm_launcher as launcher
    from ebft_engine.rollout.client import GenerationClient, Timeouts

    url = server_url(cfg)
    timeout_s = float(cfg.trl.vllm_server_timeout)
    if client is None:
        client = GenerationClient(url, Timeouts(read_cap=max(900.0, timeout_s)),
                                  log_path=os.environ.get("EBFT_SERVER_LOG"))
    waited = client.wait_for_health(timeout=timeout_s)
    base_name = client.base_model_name()
    max_model_len = client.max_model_len() or launcher.max_model_len(cfg)
    if max_model_len <= 1:
        raise StructuredError(f"the server's max_model_len is {max_model_len}")
    print(f"generation server {client.hostport} healthy after {waited:.1f}s: serving "
          f"'{base_name}', max_model_len {max_model_len}", flush=True)
    return Server(client, base_name, max_model_len)


def check_server(client: Any, *, trainer_dtype: str, lora_rank: int | None, sampling_is_plain: bool) -> None:
    """Refuse a server whose log-probs or LoRA limits do not fit this run; warn on the rest."""
    from ebft_engine.rollout.capabilities import check_server_config

    check = check_server_config(client.server_config(), trainer_dtype=trainer_dtype,
                                lora_rank=lora_rank, sampling_is_plain=sampling_is_plain)
    for message in check.warnings:
        warnings.warn(message, stacklevel=3)
    if check.errors:
        raise StructuredError(" ".join(check.errors))


def lora_synced(cfg: EbftConfig, peft: bool) -> bool:
    """Adapters published as runtime LoRA (`trl.vllm_lora_sync` with a LoRA model)."""
    return peft and cfg.trl.vllm_lora_sync


def weight_sync(cfg: EbftConfig, server: Server, model: Any, peft: bool) -> Any:
    """How the trained weights reach the server: versioned LoRA adapters or full reloads.
    Adapters an earlier run left on this server are unloaded first."""
    from ebft_engine.rollout.protocol import POLICY_PREFIX
    from ebft_engine.rollout.weight_sync import FullSync, LoRASync, lora_sync_problems

    run_dir = Path(cfg.output_dir).expanduser()
    for m in server.client.models():
        if str(m.get("id", "")).startswith(POLICY_PREFIX):
            server.client.unload_lora(m["id"])
    if lora_synced(cfg, peft):
        problems = lora_sync_problems(model)
        if problems:
            raise StructuredError("trl.vllm_lora_sync: this adapter cannot be served by "
                                  "runtime LoRA: " + "; ".join(problems))
        sync: Any = LoRASync(server.client, run_dir / "lora-sync", keep=2)
    else:
        sync = FullSync(server.client, run_dir / "weight-sync")
    sync.current_name = server.base_name  # until the first sync: the base weights
    return sync
