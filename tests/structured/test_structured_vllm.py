"""Opt-in: the same client against a real `vllm serve` (see docs/structured.md).

    EBFT_VLLM_URL=http://127.0.0.1:8765 [EBFT_VLLM_MODEL_DIR=/path/to/the/served/folder]
    [EBFT_VLLM_LORA=1] [EBFT_VLLM_TOL=3e-2] [EBFT_SERVER_TOKEN=$(cat RUN_DIR/server.token)] \
    python -m pytest -m vllm tests/structured

A server started by `ebft serve` wants its run's token (EBFT_SERVER_TOKEN); the test then also
checks that vLLM refuses `/v1/*` without it.

EBFT_VLLM_MODEL_DIR lets the test recompute the log-probs with transformers (fp32) and publish a
LoRA adapter (with EBFT_VLLM_LORA=1; the server needs --enable-lora and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, and must read the same filesystem).
"""

from __future__ import annotations

import os

import pytest

from ebft_engine.rollout.client import GenerationClient, ServerError
from tinymodel import hf_logprobs, with_random_lora

URL = os.environ.get("EBFT_VLLM_URL")
TOKEN = os.environ.get("EBFT_SERVER_TOKEN")
MODEL_DIR = os.environ.get("EBFT_VLLM_MODEL_DIR")
TOL = float(os.environ.get("EBFT_VLLM_TOL", "3e-2"))

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600),
              pytest.mark.skipif(not URL, reason="set EBFT_VLLM_URL to a running `vllm serve`")]


def _model_and_prompts():
    if not MODEL_DIR:
        return None, [[1, 2, 3, 4, 5], [6, 7, 8]]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    prompts = [tok("Write a function that adds two numbers.")["input_ids"],
               tok("The capital of France is")["input_ids"]]
    return model, prompts


def test_real_vllm_contract(tmp_path):
    client = GenerationClient(URL, token=TOKEN)
    client.wait_for_health(timeout=120)
    if TOKEN:  # vLLM's --api-key (VLLM_API_KEY) guards /v1/*
        with pytest.raises(ServerError, match="401"):
            GenerationClient(URL, retries=0).models()
    base = client.base_model_name()
    model, prompts = _model_and_prompts()
    comps = client.completions(prompts, n=3, max_tokens=12, temperature=0.7, seed=1, model=base)
    assert [(c.prompt_idx, c.sample_idx) for c in comps] == [(p, s) for p in range(2)
                                                             for s in range(3)]
    assert all(c.prompt_ids == prompts[c.prompt_idx] for c in comps)
    if model is not None:  # processed log-probs = log_softmax(logits / T)
        for c in comps:
            ref = hf_logprobs(model, prompts[c.prompt_idx], c.token_ids, 0.7)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < TOL
    with pytest.raises(ServerError, match="max"):
        client.completions(prompts[:1], n=1, max_tokens=10_000_000, model=base)
    with pytest.raises(ServerError):
        client.completions(prompts[:1], n=1, max_tokens=4, model="ebft-no-such-adapter")

    if model is not None and os.environ.get("EBFT_VLLM_LORA") == "1":
        from ebft_engine.rollout.weight_sync import LoRASync

        peft_model = with_random_lora(model, scale=0.05)
        sync = LoRASync(client, tmp_path / "lora-sync")
        name = sync.publish(peft_model, 1)
        served = client.completions(prompts[:1], n=2, max_tokens=12, temperature=1.0, seed=2,
                                    model=name)
        for c in served:
            ref = hf_logprobs(peft_model, prompts[0], c.token_ids, 1.0)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < TOL
        sync.close(unload=True)
