"""Weight sync against the real hf server: versioned LoRA adapters and full-weight reload."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TOKEN, start_hf_server
from ebft_engine.rollout.client import GenerationClient, ServerError
from ebft_engine.rollout.protocol import BASE_MODEL_NAME, policy_name
from ebft_engine.rollout.vllm_launcher import stop_server
from ebft_engine.rollout.weight_sync import FullSync, LoRASync, lora_sync_problems
from tinymodel import hf_logprobs, make_tiny_model

pytestmark = pytest.mark.timeout(240)

PROMPT = [1, 30, 31, 32, 33, 34]


def make_peft(seed: int = 1):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model(), LoraConfig(r=8, lora_alpha=16,
                                                         target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))
    randomize_lora_b(model, seed)
    return model


def randomize_lora_b(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def max_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def test_lora_sync_changes_served_logprobs_and_unloads_old(hf_server, tmp_path):
    url, log_path = hf_server
    client = GenerationClient(url, log_path=str(log_path), token=TOKEN)
    peft_model = make_peft()
    peft_model.eval()
    assert lora_sync_problems(peft_model, max_lora_rank=64) == []
    sync = LoRASync(client, tmp_path / "lora-sync", keep=2)

    base = client.completions([PROMPT], n=2, max_tokens=10, temperature=1.0, seed=11)
    with peft_model.disable_adapter():
        for c in base:
            assert max_diff(c.logprobs, hf_logprobs(peft_model, PROMPT, c.token_ids, 1.0)) < 1e-4

    name = sync.publish(peft_model, 1)
    assert name == policy_name(1) == sync.current_name
    assert (tmp_path / "lora-sync" / name / "adapter_config.json").is_file()
    assert not (tmp_path / "lora-sync" / ".tmp-v1").exists()
    log = log_path.read_text()
    assert f"load_lora_adapter name={name}" in log

    v1 = client.completions([PROMPT], n=2, max_tokens=10, temperature=1.0, seed=11, model=name)
    assert all(c.model == name and c.policy_version == 1 for c in v1)
    for c in v1:
        served_policy = hf_logprobs(peft_model, PROMPT, c.token_ids, 1.0)
        with peft_model.disable_adapter():
            base_policy = hf_logprobs(peft_model, PROMPT, c.token_ids, 1.0)
        assert max_diff(c.logprobs, served_policy) < 1e-4   # the served policy is the adapter
        assert max_diff(c.logprobs, base_policy) > 1e-2     # ... and it changed the log-probs

    # the base name still serves the base weights (adapters are never merged)
    again = client.completions([PROMPT], n=2, max_tokens=10, temperature=1.0, seed=11)
    assert [c.token_ids for c in again] == [c.token_ids for c in base]

    # two more versions: keep=2 unloads v1; its folder is deleted one sync later
    randomize_lora_b(peft_model, 2)
    sync.publish(peft_model, 2)
    randomize_lora_b(peft_model, 3)
    sync.publish(peft_model, 3)
    assert "unload_lora_adapter name=ebft-policy-v1" in log_path.read_text()
    with pytest.raises(ServerError, match="does not exist"):
        client.completions([PROMPT], n=1, max_tokens=2, model=policy_name(1))
    assert (tmp_path / "lora-sync" / policy_name(1)).exists()
    sync.publish(peft_model, 4)
    assert not (tmp_path / "lora-sync" / policy_name(1)).exists()
    ids = [m["id"] for m in client.models()]
    assert ids == [BASE_MODEL_NAME, policy_name(3), policy_name(4)]
    v4 = client.completions([PROMPT], n=1, max_tokens=6, model=policy_name(4), seed=2)[0]
    assert max_diff(v4.logprobs, hf_logprobs(peft_model, PROMPT, v4.token_ids, 1.0)) < 1e-4
    sync.close(unload=True)
    assert [m["id"] for m in client.models()] == [BASE_MODEL_NAME]


def test_lora_sync_refuses_unservable_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model(), LoraConfig(r=128, target_modules=["q_proj", "lm_head"],
                                                         use_dora=True, bias="all"))
    problems = " ".join(lora_sync_problems(model, max_lora_rank=64))
    for word in ("DoRA", "bias", "lm_head", "rank 128"):
        assert word in problems


def test_full_sync_reloads_weights(tiny_model_dir, tmp_path):
    proc, url = start_hf_server(tiny_model_dir, tmp_path / "server.log")
    try:
        client = GenerationClient(url, token=TOKEN)
        model = make_tiny_model()
        new = copy.deepcopy(model)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        sync = FullSync(client, tmp_path / "full-sync")
        sync.publish(new, 1)
        assert sync.version == 1 and sync.current_name == BASE_MODEL_NAME
        c = client.completions([PROMPT], n=1, max_tokens=8, seed=4)[0]
        assert max_diff(c.logprobs, hf_logprobs(new, PROMPT, c.token_ids, 1.0)) < 1e-4
        assert max_diff(c.logprobs, hf_logprobs(model, PROMPT, c.token_ids, 1.0)) > 1e-3
        log = (tmp_path / "server.log").read_text()
        assert "collective_rpc reload_weights" in log and "pause mode=wait" in log
        assert "resume" in log
    finally:
        stop_server(proc, grace_s=5)


def test_full_sync_of_a_lora_model_serves_a_merged_copy(tiny_model_dir, tmp_path):
    """LoRA without vllm_lora_sync: the server gets base + delta; the trainer's base is untouched."""
    proc, url = start_hf_server(tiny_model_dir, tmp_path / "server.log")
    try:
        client = GenerationClient(url, token=TOKEN)
        peft_model = make_peft(seed=5)
        peft_model.eval()
        before = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items()
                  if "lora_" not in k}
        FullSync(client, tmp_path / "full-sync").publish(peft_model, 1)
        after = peft_model.get_base_model().state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items())
        c = client.completions([PROMPT], n=2, max_tokens=8, seed=4)
        for comp in c:
            assert max_diff(comp.logprobs, hf_logprobs(peft_model, PROMPT, comp.token_ids, 1.0)) < 1e-4
            with peft_model.disable_adapter():
                base = hf_logprobs(peft_model, PROMPT, comp.token_ids, 1.0)
            assert max_diff(comp.logprobs, base) > 1e-2
    finally:
        stop_server(proc, grace_s=5)
