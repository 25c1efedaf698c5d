"""Our small transformers generation server: the subset of vLLM's HTTP API that ebft's client uses.

Runs where vLLM cannot (a CPU, CI) and is what `ebft serve` starts for `vllm.backend: hf`. It speaks
vLLM's field names, status codes and error body (`{"error": {"message", "type", "param", "code"}}`)
so the one client (`client.py`) works against both. Routes (vllm-integration.md §3.3-3.4, §7(d)):

    GET  /health, /version, /v1/models, /is_paused, /weight_info
    POST /v1/completions          token-id prompts, n, temperature/top_p/top_k/min_p, seed,
                                  max_tokens, stop_token_ids, ignore_eos, logprobs (of the
                                  sampled token, processed = of the sampling distribution, as
                                  `--logprobs-mode processed_logprobs`), return_token_ids,
                                  "token_id:N" tokens; choices prompt-major
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   peft multi-adapter, by name
    POST /collective_rpc          only {"method": "reload_weights", "kwargs": {"weights_path"}}
    POST /pause, /resume, /reset_prefix_cache, /update_weight_version

One request at a time holds the model (a lock); `/health` never waits on it. Sampling is our own
KV-cached loop over the n copies of a prompt, so the returned log-probs are exactly
`log_softmax(processed logits)` of the distribution each token was drawn from. Every request and
every adapter load/unload is logged to stdout (the launcher sends it to server.log).

    python -m ebft_engine.rollout.hf_server --model DIR [--port 0] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import Request  # module level: route annotations are resolved from these globals

from ebft_engine.rollout.protocol import BASE_MODEL_NAME

GREEDY_BELOW = 1e-5
"""Temperatures below this mean greedy decoding (as vLLM)."""


def log(msg: str) -> None:
    print(f"[hf-server {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class ApiError(Exception):
    """An error answered with vLLM's body shape."""

    TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}


# ------------------------------------------------------------------------------------------------
# Sampling


def processed_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       min_p: float = 0.0) -> torch.Tensor:
    """log of the distribution tokens are sampled from: temperature, then top-k, top-p, min-p
    (vLLM's order), renormalised. [B, V] float32. Temperature 0 = greedy on the raw logits."""
    x = logits.float()
    if temperature > GREEDY_BELOW:
        x = x / temperature
    if top_k and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if 0 < top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop_sorted = (probs.cumsum(-1) - probs) > top_p  # keep the smallest prefix reaching p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    if min_p and min_p > 0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return torch.log_softmax(x, dim=-1)


def _cache_kwarg(model) -> str:
    """`cache` in newer transformers, `past_key_values` before (looked up on the unwrapped model:
    a peft wrapper's forward takes **kwargs)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def sample_group(model, prompt_ids: list[int], n: int, max_tokens: int, *, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 stop_ids: set[int] = frozenset(), min_tokens: int = 0,
                 generator: torch.Generator | None = None) -> list[dict]:
    """Sample n continuations of one prompt with a shared KV cache (the n rows are identical
    prompts, so no padding). Returns per sample: token_ids, logprobs, finish_reason, stop_reason."""
    device = next(model.parameters()).device
    cache_kw = _cache_kwarg(model)
    ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    logits = out.logits[:, -1, :]
    tokens: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    done = [False] * n
    reasons: list[tuple[str, int | None]] = [("length", None)] * n
    stop_list = sorted(stop_ids)
    for t in range(max_tokens):
        if t < min_tokens and stop_list:
            logits = logits.clone()
            logits[:, stop_list] = float("-inf")
        lp = processed_logprobs(logits, temperature, top_k, top_p, min_p)
        if temperature > GREEDY_BELOW:
            nxt = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(-1)
        else:
            nxt = lp.argmax(-1)
        chosen = lp.gather(1, nxt[:, None]).squeeze(1)
        nxt_l, chosen_l = nxt.tolist(), chosen.tolist()
        for i in range(n):
            if done[i]:
                continue
            tokens[i].append(nxt_l[i])
            lps[i].append(chosen_l[i])
            if nxt_l[i] in stop_ids:
                done[i] = True
                reasons[i] = ("stop", nxt_l[i])
        if all(done) or t == max_tokens - 1:
            break
        out = model(input_ids=nxt[:, None], use_cache=True, **{cache_kw: cache})
        cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        logits = out.logits[:, -1, :]
    return [{"token_ids": tokens[i], "logprobs": lps[i], "finish_reason": reasons[i][0],
             "stop_reason": reasons[i][1]} for i in range(n)]


# ------------------------------------------------------------------------------------------------
# Server state: the base model, its peft wrapper once an adapter is loaded, the adapters


@dataclass
class ServerState:
    model: Any
    tokenizer: Any
    model_path: str
    served_name: str = BASE_MODEL_NAME
    max_model_len: int = 2048
    max_lora_rank: int = 64
    seed: int = 0
    peft: Any = None
    adapters: dict[str, str] = field(default_factory=dict)
    paused: bool = False
    weight_version: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self):
        self.rng.manual_seed(self.seed)

    # -- adapters --------------------------------------------------------------------------------

    def load_lora(self, name: str, path: str, load_inplace: bool = False) -> None:
        if not name:
            raise ApiError(400, "lora_name must be a non-empty string", "lora_name")
        if name == self.served_name:
            raise ApiError(400, f"The lora adapter name '{name}' is the base model's name.")
        if name in self.adapters and not load_inplace:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to "
                                "load the adapter in place, set 'load_inplace' to True.")
        cfg_file = Path(path) / "adapter_config.json"
        if not cfg_file.is_file():
            raise ApiError(404, f"No adapter found for {path}")
        try:
            rank = int(json.loads(cfg_file.read_text()).get("r", 0))
        except (ValueError, OSError) as e:
            raise ApiError(400, f"Unreadable adapter config {cfg_file}: {e}") from e
        if rank > self.max_lora_rank:
            raise ApiError(400, f"LoRA rank {rank} is greater than max_lora_rank "
                                f"{self.max_lora_rank}.")
        from peft import PeftModel

        with self.lock:
            if name in self.adapters:
                self._delete(name)
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name,
                                                          is_trainable=False)
                    self.peft.eval()
                else:
                    self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            except Exception as e:  # a broken adapter folder must not kill the server
                raise ApiError(400, f"Loading LoRA adapter '{name}' from {path} failed: {e}") from e
            self.adapters[name] = str(path)

    def unload_lora(self, name: str) -> None:
        if name not in self.adapters:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        with self.lock:
            self._delete(name)

    def _delete(self, name: str) -> None:
        del self.adapters[name]
        if not self.adapters:  # last one: remove the LoRA layers altogether (never merged)
            self.model = self.peft.unload()
            self.peft = None
        else:
            self.peft.delete_adapter(name)

    # -- weights ---------------------------------------------------------------------------------

    def reload_weights(self, weights_path: str) -> int:
        """Load a safetensors checkpoint (HF parameter names) into the base weights in place."""
        from safetensors.torch import load_file

        files = sorted(Path(weights_path).glob("*.safetensors"))
        if not files:
            raise ApiError(400, f"reload_weights: no *.safetensors files in {weights_path}")
        with self.lock:
            params = dict(self.model.named_parameters())
            params.update(dict(self.model.named_buffers()))
            n = 0
            for f in files:
                for key, tensor in load_file(str(f)).items():
                    target = params.get(key)
                    if target is None and key.endswith(".weight"):  # peft-wrapped linear
                        target = params.get(key[: -len(".weight")] + ".base_layer.weight")
                    if target is None and key.endswith(".bias"):
                        target = params.get(key[: -len(".bias")] + ".base_layer.bias")
                    if target is None:
                        continue
                    with torch.no_grad():
                        target.copy_(tensor.to(target.dtype))
                    n += 1
            if n == 0:
                raise ApiError(400, f"reload_weights: no tensor in {weights_path} matched a "
                                    "parameter name of the served model")
            return n

    # -- generation ------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return [self.served_name, *self.adapters]

    def completions(self, body: dict) -> dict:
        name = body.get("model") or self.served_name
        if name != self.served_name and name not in self.adapters:
            raise ApiError(404, f"The model `{name}` does not exist.", "model")
        if self.paused:
            raise ApiError(503, "The server is paused (POST /resume to continue).")
        prompts = self._prompts(body.get("prompt"))
        n = _int(body, "n", 1, low=1)
        max_tokens = body.get("max_tokens")
        max_tokens = 16 if max_tokens is None else _int(body, "max_tokens", 16, low=1)
        for i, p in enumerate(prompts):
            if len(p) + max_tokens > self.max_model_len:
                raise ApiError(400, f"'max_tokens' is too large: {max_tokens}. This model's maximum "
                                    f"context length (max_model_len) is {self.max_model_len} tokens "
                                    f"and prompt {i} has {len(p)} input tokens "
                                    f"({max_tokens} > {self.max_model_len} - {len(p)}).",
                               "max_tokens")
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None
                            else 1.0)
        top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
        top_k = int(body.get("top_k") if body.get("top_k") is not None else -1)
        min_p = float(body.get("min_p") if body.get("min_p") is not None else 0.0)
        if temperature < 0 or not 0 < top_p <= 1:
            raise ApiError(400, "temperature must be >= 0 and top_p in (0, 1].")
        stop_ids = {int(t) for t in (body.get("stop_token_ids") or [])}
        if not body.get("ignore_eos"):
            stop_ids |= self._eos_ids()
        want_logprobs = body.get("logprobs") is not None
        as_ids = bool(body.get("return_tokens_as_token_ids")) or self.tokenizer is None
        seed = body.get("seed")
        gen = torch.Generator(device=next(self.model.parameters()).device)
        gen.manual_seed(int(seed) if seed is not None
                        else int(torch.randint(0, 2**62, (1,), generator=self.rng)))
        choices, n_out = [], 0
        with self.lock:
            if name != self.served_name and name not in self.adapters:
                raise ApiError(404, f"The model `{name}` does not exist.", "model")
            model, ctx = self._model_for(name)
            with ctx:
                for pi, p in enumerate(prompts):
                    samples = sample_group(model, p, n, max_tokens, temperature=temperature,
                                           top_p=top_p, top_k=top_k, min_p=min_p, stop_ids=stop_ids,
                                           min_tokens=int(body.get("min_tokens") or 0),
                                           generator=gen)
                    for s in samples:
                        choices.append(self._choice(len(choices), p, s, body, want_logprobs, as_ids))
                        n_out += len(s["token_ids"])
        n_in = sum(len(p) for p in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": name, "choices": choices,
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                          "total_tokens": n_in + n_out}}

    def _model_for(self, name: str):
        import contextlib

        if self.peft is None:
            return self.model, contextlib.nullcontext()
        if name == self.served_name:
            return self.peft, self.peft.disable_adapter()
        if name not in self.adapters:  # unloaded while this request waited for the lock
            raise ApiError(404, f"The model `{name}` does not exist.", "model")
        self.peft.set_adapter(name)
        return self.peft, contextlib.nullcontext()

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is None:
            eos = getattr(getattr(self.model, "config", None), "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}

    def _prompts(self, prompt) -> list[list[int]]:
        if prompt is None or (isinstance(prompt, list) and not prompt):
            raise ApiError(400, "prompt must be a non-empty list of token ids, a list of such "
                                "lists, or text.", "prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ApiError(400, "text prompts need a tokenizer; send token ids", "prompt")
                p = self.tokenizer.encode(p)
            if not isinstance(p, list) or not p or not all(isinstance(t, int) for t in p):
                raise ApiError(400, "each prompt must be a non-empty list of token ids", "prompt")
            vocab = self.model.config.vocab_size
            if any(t < 0 or t >= vocab for t in p):
                raise ApiError(400, f"token id out of vocabulary range [0, {vocab})", "prompt")
            out.append(p)
        return out

    def _choice(self, index, prompt, s, body, want_logprobs, as_ids) -> dict:
        ids = s["token_ids"]
        tok = self.tokenizer
        text = tok.decode(ids, skip_special_tokens=body.get("skip_special_tokens", True)) \
            if tok is not None else ""
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None,
                                  "finish_reason": s["finish_reason"],
                                  "stop_reason": s["stop_reason"]}
        if want_logprobs:
            names = [f"token_id:{t}" for t in ids] if as_ids else \
                [tok.convert_ids_to_tokens(t) for t in ids]
            offsets, pos = [], 0
            for piece in names:
                offsets.append(pos)
                pos += len(piece)
            choice["logprobs"] = {"text_offset": offsets, "token_logprobs": s["logprobs"],
                                  "tokens": names,
                                  "top_logprobs": [{nm: lp} for nm, lp in zip(names, s["logprobs"])]}
        if body.get("return_token_ids"):
            choice["prompt_token_ids"] = list(prompt)
            choice["token_ids"] = list(ids)
        return choice


def _int(body: dict, key: str, default: int, low: int | None = None) -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{key} must be an integer, got {v!r}", key)
    if low is not None and v < low:
        raise ApiError(400, f"{key} must be at least {low}, got {v}", key)
    return v


# ------------------------------------------------------------------------------------------------
# HTTP app


def create_app(state: ServerState):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    app = FastAPI(title="ebft hf generation server")

    async def _json(request: Request) -> dict:
        try:
            body = await request.json()
        except Exception as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):
        log(f"500 {type(exc).__name__}: {exc}")
        return JSONResponse(ApiError(500, f"{type(exc).__name__}: {exc}").body(), status_code=500)

    @app.get("/health")
    def health():
        return Response(status_code=200)

    @app.get("/version")
    def version():
        from ebft_engine import __version__

        return {"version": f"ebft-hf-{__version__}"}

    @app.get("/server_info")
    def server_info():
        """The subset of vLLM's dev-mode self-description the trainer checks (capabilities.py)."""
        return {"vllm_config": {
            "model_config": {"logprobs_mode": "processed_logprobs", "generation_config": "vllm",
                             "max_model_len": state.max_model_len,
                             "dtype": str(next(state.model.parameters()).dtype)},
            "lora_config": {"max_lora_rank": state.max_lora_rank},
        }}

    @app.get("/v1/models")
    def models():
        created = int(time.time())
        data = [{"id": state.served_name, "object": "model", "created": created,
                 "owned_by": "ebft", "root": state.model_path, "parent": None,
                 "max_model_len": state.max_model_len}]
        for name, path in list(state.adapters.items()):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "ebft",
                         "root": path, "parent": state.served_name,
                         "max_model_len": state.max_model_len})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        import anyio

        t0 = time.perf_counter()
        body = await _json(request)
        desc = (f"model={body.get('model')} prompts={_count_prompts(body.get('prompt'))} "
                f"n={body.get('n', 1)} max_tokens={body.get('max_tokens')}")
        try:
            result = await anyio.to_thread.run_sync(state.completions, body)
        except ApiError as e:
            log(f"POST /v1/completions {desc} -> {e.status} {e.message}")
            raise
        except Exception as e:  # report, stay up
            log(f"POST /v1/completions {desc} -> 500 {type(e).__name__}: {e}")
            raise ApiError(500, f"{type(e).__name__}: {e}") from e
        log(f"POST /v1/completions {desc} -> 200 ({result['usage']['completion_tokens']} tokens, "
            f"{time.perf_counter() - t0:.2f}s)")
        return result

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        import anyio

        body = await _json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        t0 = time.perf_counter()
        try:
            await anyio.to_thread.run_sync(state.load_lora, name, path,
                                           bool(body.get("load_inplace")))
        except ApiError as e:
            log(f"load_lora_adapter name={name} path={path} -> {e.status} {e.message}")
            raise
        log(f"load_lora_adapter name={name} path={path} -> 200 ({time.perf_counter() - t0:.2f}s; "
            f"loaded: {', '.join(state.adapters) or '-'})")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        import anyio

        body = await _json(request)
        name = body.get("lora_name")
        try:
            await anyio.to_thread.run_sync(state.unload_lora, name)
        except ApiError as e:
            log(f"unload_lora_adapter name={name} -> {e.status} {e.message}")
            raise
        log(f"unload_lora_adapter name={name} -> 200 (loaded: {', '.join(state.adapters) or '-'})")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/collective_rpc")
    async def collective_rpc(request: Request):
        import anyio

        body = await _json(request)
        method, kwargs = body.get("method"), body.get("kwargs") or {}
        if method != "reload_weights" or not kwargs.get("weights_path"):
            raise ApiError(400, "this server supports only collective_rpc method 'reload_weights' "
                                "with kwargs.weights_path")
        t0 = time.perf_counter()
        n = await anyio.to_thread.run_sync(state.reload_weights, kwargs["weights_path"])
        log(f"collective_rpc reload_weights weights_path={kwargs['weights_path']} -> 200 "
            f"({n} tensors, {time.perf_counter() - t0:.2f}s)")
        return {"results": [None]}

    @app.post("/pause")
    def pause(mode: str = "abort"):
        state.paused = True
        log(f"pause mode={mode}")
        return {"status": "paused"}

    @app.post("/resume")
    def resume():
        state.paused = False
        log("resume")
        return {"status": "resumed"}

    @app.get("/is_paused")
    def is_paused():
        return {"is_paused": state.paused}

    @app.post("/reset_prefix_cache")
    def reset_prefix_cache():
        return {"success": True}  # no prefix cache here

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        state.weight_version = (await _json(request)).get("new_version")
        return {"weight_version": state.weight_version}

    @app.get("/weight_info")
    def weight_info():
        return {"weight_version": state.weight_version}

    return app


def _count_prompts(prompt) -> int:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        return len(prompt)
    return 1 if prompt else 0


# ------------------------------------------------------------------------------------------------
# Entry point


def load_state(model_dir: str, *, served_name: str = BASE_MODEL_NAME, max_model_len: int | None = None,
               dtype: str = "auto", device: str = "cpu", seed: int = 0,
               max_lora_rank: int = 64, gguf_file: str | None = None) -> ServerState:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **extra).to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **extra)
    except Exception:  # token ids are enough; text and token names then need ids
        tokenizer = None
    if max_model_len is None:
        max_model_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return ServerState(model=model, tokenizer=tokenizer, model_path=str(model_dir),
                       served_name=served_name, max_model_len=max_model_len, seed=seed,
                       max_lora_rank=max_lora_rank)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"hf server: cannot listen on {host}:{port}: {e}. Is another server "
                         "already using that port? Pick another with --port (0 = any free port).")
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 0) -> None:
    """Bind, print the bound address, serve until SIGINT/SIGTERM."""
    import uvicorn

    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    log(f"model {state.model_path} served as '{state.served_name}' "
        f"(max_model_len {state.max_model_len}, max_lora_rank {state.max_lora_rank})")
    log(f"listening on http://{host}:{bound}")
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
    log("stopped")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ebft_engine.rollout.hf_server",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="transformers model folder (or hub id)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
    p.add_argument("--served-model-name", default=BASE_MODEL_NAME)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"loading {args.model} (dtype {args.dtype}, device {args.device})")
    state = load_state(args.model, served_name=args.served_model_name,
                       max_model_len=args.max_model_len, dtype=args.dtype, device=args.device,
                       seed=args.seed, max_lora_rank=args.max_lora_rank, gguf_file=args.gguf_file)
    serve(state, args.host, args.port)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
