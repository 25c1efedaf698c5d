"""Check that the generation server is set up the way the trainer's math needs.

vLLM accepts unknown request fields silently, so a server started by hand with the wrong flags
answers every request and only the training goes wrong: raw log-probs make every importance
weight off by the temperature, a missing `--enable-lora` fails the first sync minutes in, a dtype
unlike the trainer's skews the weights by rounding. vLLM in dev mode describes itself at
`GET /server_info?config_format=json` (`vllm_config.model_config`, `.lora_config`); our hf server
answers the same subset. A server without the route (vLLM outside dev mode) cannot be checked,
which is a warning, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServerCheck:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _dtype_name(value: Any) -> str:
    return str(value or "").removeprefix("torch.")


def check_server_config(vllm_config: dict[str, Any] | None, *, trainer_dtype: str, lora_rank: int | None,
                        sampling_is_plain: bool) -> ServerCheck:
    """Compare the server's own description with what the trainer is about to do.

    Args:
        vllm_config: `vllm_config` of `/server_info?config_format=json`, or None without the route.
        trainer_dtype: the policy's dtype name (`float32`, `bfloat16`).
        lora_rank: the adapter's rank when weights sync as runtime LoRA, else None.
        sampling_is_plain: temperature 1 and no top-p/top-k/min-p, where raw and processed
            log-probs are the same numbers.
    """
    check = ServerCheck()
    if not isinstance(vllm_config, dict):
        check.warnings.append(
            "the generation server does not describe itself (no GET /server_info; vLLM answers it "
            "only with VLLM_SERVER_DEV_MODE=1), so its log-prob mode, LoRA limits and dtype were not "
            "checked. `ebft serve` starts vLLM with everything the trainer needs.")
        return check
    model = vllm_config.get("model_config") or {}
    mode = model.get("logprobs_mode")
    if mode not in (None, "processed_logprobs") and not sampling_is_plain:
        check.errors.append(
            f"the generation server returns {mode} log-probs, which ignore the temperature and "
            "top-p/top-k the trainer samples with, so every importance weight would be wrong. "
            "Start vLLM with --logprobs-mode processed_logprobs (`ebft serve` does).")
    if model.get("generation_config") not in (None, "vllm"):
        check.warnings.append(
            "the generation server applies the model's generation_config.json, which may add "
            "top-k/top-p the trainer does not know of; start vLLM with --generation-config vllm "
            "(`ebft serve` does).")
    served = _dtype_name(model.get("dtype"))
    if served and served != "auto" and served != trainer_dtype:
        check.warnings.append(
            f"the generation server computes in {served} and the trainer in {trainer_dtype}: "
            "importance weights will carry the rounding difference (is_ratio far from 1 even at "
            "staleness 0). Set torch_dtype (used by both) or restart the server with this config.")
    if lora_rank is not None:
        lora = vllm_config.get("lora_config")
        if not isinstance(lora, dict):
            check.errors.append(
                "trl.vllm_lora_sync is on but the generation server has no LoRA support: start "
                "vLLM with --enable-lora --max-lora-rank R (`ebft serve` does), or set "
                "trl.vllm_lora_sync: false to sync full weights.")
        elif isinstance(lora.get("max_lora_rank"), int) and lora["max_lora_rank"] < lora_rank:
            check.errors.append(
                f"lora_r is {lora_rank} but the generation server takes adapters up to rank "
                f"{lora['max_lora_rank']}: restart it with --max-lora-rank {lora_rank} or more "
                "(`ebft serve` picks the rank from the config).")
    return check
