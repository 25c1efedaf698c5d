"""The generation server and everything that talks to it (vllm-integration.md).

    protocol.py       served names (ebft-base, ebft-policy-vN), Completion, SamplingSpec
    client.py         GenerationClient: the only HTTP client (health, completions, LoRA, reload)
    capabilities.py   is a server's self-description (/server_info) fit for this run?
    vllm_launcher.py  server command lines (vllm or ours) and child processes
    weight_sync.py    publishing trained weights: versioned LoRA adapters or full reloads
    prefetch.py       async structured mode: the producer thread and its staleness gate
    hf_server.py      our transformers server's HTTP surface (FastAPI routes, socket, CLI)
    hf_engine.py      the engine behind it: served model, adapters, request handling
    hf_sampling.py    its sampling distribution and KV-cached sampling loop

May import: config, modeling, the standard library, httpx, torch/transformers/peft (weight sync
and the hf server), fastapi/uvicorn (hf_server.py only). Never structured/, strided/, train.py:
the modes build on rollout/, not the reverse. hf_server.py, hf_engine.py and hf_sampling.py run in
the server process; the rest in the trainer's.
"""
