"""The generation engine behind our hf server, in process and without HTTP (hf_engine.py,
hf_sampling.py): the sampling distribution against a brute-force reference, the KV-cached sampler's
log-probs against a full recompute, and vLLM's error semantics. The HTTP contract itself is
test_structured_server.py's."""

from __future__ import annotations

import math

import pytest
import torch

from ebft_engine.rollout.hf_engine import ApiError, load_state
from ebft_engine.rollout.hf_sampling import processed_logprobs
from tinymodel import END


def reference_logprobs(row: list[float], temperature: float, top_k: int, top_p: float,
                       min_p: float) -> list[float]:
    """One row, token by token: scale, keep the top-k, keep each token whose more probable
    tokens hold at most top_p of the mass, keep those at least min_p x the top probability,
    renormalise; dropped tokens get -inf."""
    x = [v / temperature for v in row]
    kept = set(range(len(x)))
    if 0 < top_k < len(x):
        kept = set(sorted(kept, key=lambda i: -x[i])[:top_k])

    def probs(ids):
        z = sum(math.exp(x[i]) for i in ids)
        return {i: math.exp(x[i]) / z for i in ids}

    if 0 < top_p < 1:
        p = probs(kept)
        kept = {i for i in kept if sum(q for j, q in p.items() if x[j] > x[i]) <= top_p}
    if min_p > 0:
        p = probs(kept)
        kept = {i for i in kept if p[i] >= min_p * max(p.values())}
    p = probs(kept)
    return [math.log(p[i]) if i in kept else -math.inf for i in range(len(x))]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (0.8, 0, 0.6, 0.0),
    (1.3, 0, 1.0, 0.2), (0.9, 7, 0.8, 0.05),
])
def test_processed_logprobs_against_a_brute_force_reference(temperature, top_k, top_p, min_p):
    logits = torch.randn(4, 13, generator=torch.Generator().manual_seed(3)) * 2
    got = processed_logprobs(logits, temperature, top_k, top_p, min_p)
    for b in range(logits.shape[0]):
        ref = torch.tensor(reference_logprobs(logits[b].tolist(), temperature, top_k, top_p, min_p))
        assert torch.equal(torch.isinf(got[b]), torch.isinf(ref)), b
        finite = ~torch.isinf(ref)
        torch.testing.assert_close(got[b][finite], ref[finite].float(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def state(tiny_model_dir):
    return load_state(str(tiny_model_dir), max_model_len=64, seed=5)


def test_cached_sampler_logprobs_match_a_full_recompute(state):
    """The engine samples with a KV cache; each returned log-prob is that of the truncated
    distribution a full forward over prompt + tokens so far gives."""
    prompt, n = [1, 20, 21, 22], 3
    reply = state.completions({"prompt": prompt, "n": n, "max_tokens": 8, "temperature": 0.9,
                               "top_k": 6, "top_p": 0.9, "logprobs": 0, "return_token_ids": True,
                               "seed": 11, "ignore_eos": True})
    assert len(reply["choices"]) == n
    assert reply["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in reply["choices"])
    for c in reply["choices"]:
        ids = c["token_ids"]
        assert len(ids) == 8 and c["finish_reason"] == "length" and c["prompt_token_ids"] == prompt
        with torch.no_grad():
            logits = state.model(torch.tensor([prompt + ids])).logits[0]
        rows = logits[len(prompt) - 1:len(prompt) - 1 + len(ids)]
        ref = processed_logprobs(rows, 0.9, 6, 0.9).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        got = torch.tensor(c["logprobs"]["token_logprobs"])
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_eos_ends_a_sample_unless_ignored(state):
    reply = state.completions({"prompt": [1, 30], "n": 4, "max_tokens": 40, "temperature": 1.0,
                               "stop_token_ids": [], "return_token_ids": True, "seed": 2})
    for c in reply["choices"]:
        stopped = c["finish_reason"] == "stop"
        assert stopped == (c["token_ids"][-1] == END) and END not in c["token_ids"][:-1]


def test_bad_requests_raise_vllm_errors(state):
    with pytest.raises(ApiError) as info:
        state.completions({"model": "no-such-adapter", "prompt": [1, 2]})
    assert info.value.status == 404 and info.value.body()["error"]["type"] == "NotFoundError"
    with pytest.raises(ApiError) as info:
        state.completions({"prompt": [1] * 60, "max_tokens": 10})
    assert info.value.status == 400 and info.value.param == "max_tokens"
    assert "max_model_len" in info.value.message
    with pytest.raises(ApiError, match="n must be at least 1"):
        state.completions({"prompt": [1, 2], "n": 0})
