"""Our small transformers generation server: the subset of vLLM's HTTP API that ebft's client uses.

Runs where vLLM cannot (a CPU, CI) and is what `ebft serve` starts for `vllm.backend: hf`. It speaks
vLLM's field names, status codes and error body (`{"error": {"message", "type", "param", "code"}}`)
so the one client (`client.py`) works against both. This module is the HTTP surface (FastAPI
routes, the socket, the command line); the engine behind it is `hf_engine.py` (the served model
and its adapters, request handling) with `hf_sampling.py` (the sampling loop). Routes
(vllm-integration.md §3.3-3.4, §7(d)):

    GET  /health, /version, /v1/models, /is_paused, /weight_info, /server_info
    POST /v1/completions          token-id prompts, n, temperature/top_p/top_k/min_p, seed,
                                  max_tokens, stop_token_ids, ignore_eos, logprobs (of the
                                  sampled token, processed = of the sampling distribution, as
                                  `--logprobs-mode processed_logprobs`), return_token_ids,
                                  "token_id:N" tokens; choices prompt-major
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   peft multi-adapter, by name
    POST /collective_rpc          only {"method": "reload_weights", "kwargs": {"weights_path"}}
    POST /pause, /resume, /reset_prefix_cache, /update_weight_version

One request at a time holds the model (a lock); `/health` never waits on it. Every request and
every adapter load/unload is logged to stdout (the launcher sends it to server.log).

    python -m ebft_engine.rollout.hf_server --model DIR [--port 0] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
from fastapi import Request  # module level: route annotations are resolved from these globals

from ebft_engine.rollout.hf_engine import ApiError, ServerState, load_state
from ebft_engine.rollout.protocol import BASE_MODEL_NAME


def log(msg: str) -> None:
    print(f"[hf-server {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# HTTP app


def create_app(state: ServerState):
    """The FastAPI app serving `state`, one group of routes at a time."""
    from fastapi import FastAPI

    app = FastAPI(title="ebft hf generation server")
    _error_handlers(app)
    _info_routes(app, state)
    _completion_route(app, state)
    _weight_routes(app, state)
    _control_routes(app, state)
    return app


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except Exception as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _error_handlers(app) -> None:
    """ApiError -> vLLM's error body; anything else -> a 500 in the same shape (logged)."""
    from fastapi.responses import JSONResponse

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):
        log(f"500 {type(exc).__name__}: {exc}")
        return JSONResponse(ApiError(500, f"{type(exc).__name__}: {exc}").body(), status_code=500)


def _info_routes(app, state: ServerState) -> None:
    """/health, /version, /server_info, /v1/models: never wait on the model's lock."""
    from fastapi.responses import Response

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


def _completion_route(app, state: ServerState) -> None:
    """/v1/completions, run in a worker thread so /health stays responsive."""

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


def _weight_routes(app, state: ServerState) -> None:
    """LoRA adapters by name, and in-place reloads of the base weights."""
    from fastapi.responses import PlainTextResponse

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


def _control_routes(app, state: ServerState) -> None:
    """Pause / resume generation, and the weight version the trainer tags a sync with."""

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


def _count_prompts(prompt) -> int:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
        return len(prompt)
    return 1 if prompt else 0


# ------------------------------------------------------------------------------------------------
# Entry point


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
