"""Our hf generation server, in a real subprocess, through the real client: the HTTP contract."""

from __future__ import annotations

import httpx
import pytest

from ebft_engine.rollout.client import GenerationClient, ServerError
from ebft_engine.rollout.protocol import BASE_MODEL_NAME
from tinymodel import END, hf_logprobs, make_tiny_model

pytestmark = pytest.mark.timeout(180)

PROMPTS = [[1, 10, 11, 12, 13], [1, 40, 41], [1, 50, 51, 52, 53, 54, 55]]


def test_health_and_models(hf_server):
    url, _ = hf_server
    client = GenerationClient(url)
    assert client.health()
    assert client.wait_for_health(timeout=120) >= 0.0  # returns (the seconds it took) once healthy
    models = client.models()
    assert models[0]["id"] == BASE_MODEL_NAME and models[0]["max_model_len"] == 512
    assert client.base_model_name() == BASE_MODEL_NAME
    assert client.max_model_len() == 512


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completions_grouping_and_exact_logprobs(hf_server, temperature):
    url, _ = hf_server
    client = GenerationClient(url)
    n = 3
    comps = client.completions(PROMPTS, n=n, max_tokens=12, temperature=temperature, seed=7)
    assert len(comps) == len(PROMPTS) * n
    assert [(c.prompt_idx, c.sample_idx) for c in comps] == \
        [(p, s) for p in range(len(PROMPTS)) for s in range(n)]
    model = make_tiny_model()  # same seed as the served folder
    for c in comps:
        assert c.prompt_ids == PROMPTS[c.prompt_idx]
        assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
        assert c.model == BASE_MODEL_NAME and c.policy_version == 0
        ref = hf_logprobs(model, PROMPTS[c.prompt_idx], c.token_ids, temperature)
        assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-4
        if c.finish_reason == "length":
            assert len(c.token_ids) == 12
    # the n samples of a prompt are different draws (seeded request, one generator)
    assert len({tuple(c.token_ids) for c in comps[:n]}) > 1


def test_seed_makes_requests_reproducible(hf_server):
    client = GenerationClient(hf_server[0])
    a = client.completions(PROMPTS[:1], n=2, max_tokens=6, seed=123)
    b = client.completions(PROMPTS[:1], n=2, max_tokens=6, seed=123)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_per_prompt_max_tokens(hf_server):
    client = GenerationClient(hf_server[0])
    comps = client.completions(PROMPTS, n=2, max_tokens=[3, 5, 3], stop_token_ids=[],
                               seed=1)
    for c in comps:
        assert len(c.token_ids) <= [3, 5, 3][c.prompt_idx]


def test_stop_token_ids_honoured(hf_server):
    """Make every token a stop token but one: generation must stop at the first sampled stop id."""
    client = GenerationClient(hf_server[0])
    stops = list(range(0, 60))
    comps = client.completions(PROMPTS, n=4, max_tokens=20, stop_token_ids=stops, seed=3)
    stopped = [c for c in comps if c.finish_reason == "stop"]
    assert stopped, "with 60 of 104 ids as stop ids some sample must stop"
    for c in comps:
        assert all(t not in stops for t in c.token_ids[:-1])
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stops
        else:
            assert len(c.token_ids) == 20


def test_eos_stops_unless_ignored(hf_server):
    url = hf_server[0]
    body = {"model": BASE_MODEL_NAME, "prompt": [PROMPTS[0]], "n": 8, "max_tokens": 30,
            "temperature": 1.0, "seed": 5, "logprobs": 0, "return_token_ids": True,
            "return_tokens_as_token_ids": True, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert all(len(c["token_ids"]) == 30 for c in r["choices"])
    assert r["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")
    assert r["choices"][0]["prompt_token_ids"] == PROMPTS[0]
    assert all(c["index"] == i for i, c in enumerate(r["choices"]))
    del body["ignore_eos"]
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    for c in r["choices"]:
        assert END not in c["token_ids"][:-1]


def test_errors_have_vllm_shape(hf_server):
    url, _ = hf_server
    r = httpx.post(url + "/v1/completions", timeout=30,
                   json={"model": BASE_MODEL_NAME, "prompt": [PROMPTS[0]], "max_tokens": 600})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "max_model_len" in err["message"] and err["code"] == 400
    assert err["type"] == "BadRequestError"
    r = httpx.post(url + "/v1/completions", timeout=30,
                   json={"model": "no-such-model", "prompt": [PROMPTS[0]], "max_tokens": 4})
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    # through the client: a 4xx is an immediate ServerError quoting the server's message
    client = GenerationClient(url)
    with pytest.raises(ServerError, match="max_model_len"):
        client.completions([PROMPTS[0]], n=1, max_tokens=600)
    with pytest.raises(ServerError, match="does not exist"):
        client.completions([PROMPTS[0]], n=1, max_tokens=4, model="no-such-model")
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "nope"}, timeout=30)
    assert r.status_code == 404
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nope"},
                   timeout=30)
    assert r.status_code == 404 and "No adapter found" in r.json()["error"]["message"]


def test_requests_are_logged(hf_server):
    url, log_path = hf_server
    GenerationClient(url).completions([PROMPTS[1]], n=1, max_tokens=2)
    assert "POST /v1/completions model=ebft-base prompts=1 n=1 max_tokens=2 -> 200" in \
        log_path.read_text()
