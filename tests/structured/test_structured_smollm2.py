"""The hf server on the real SmolLM2-135M-Instruct (fp32): exact log-probs and a LoRA sync."""

from __future__ import annotations

import pytest
import torch

from conftest import TOKEN, start_hf_server
from ebft_engine.rollout.client import GenerationClient
from ebft_engine.rollout.vllm_launcher import stop_server
from ebft_engine.rollout.weight_sync import LoRASync
from tinymodel import hf_logprobs, with_random_lora

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_smollm2_served_logprobs_and_lora_sync(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about rain."}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    proc, url = start_hf_server(smollm2_dir, tmp_path / "server.log", "--dtype", "float32")
    try:
        client = GenerationClient(url, token=TOKEN)
        comps = client.completions([ids], n=2, max_tokens=12, temperature=0.7, seed=1,
                                   stop_token_ids=[tok.convert_tokens_to_ids("<|im_end|>")])
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        for c in comps:
            ref = hf_logprobs(model, ids, c.token_ids, 0.7)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-4
        peft_model = with_random_lora(model, scale=0.02)
        name = LoRASync(client, tmp_path / "lora-sync").publish(peft_model, 1)
        served = client.completions([ids], n=2, max_tokens=12, temperature=1.0, seed=2, model=name)
        for c in served:
            ref = hf_logprobs(peft_model, ids, c.token_ids, 1.0)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-4
            with peft_model.disable_adapter():
                base = hf_logprobs(peft_model, ids, c.token_ids, 1.0)
            assert max(abs(a - b) for a, b in zip(c.logprobs, base)) > 1e-3
        assert f"load_lora_adapter name={name}" in (tmp_path / "server.log").read_text()
    finally:
        stop_server(proc, grace_s=5)
