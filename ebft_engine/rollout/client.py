"""The one HTTP client of the generation server: `vllm serve` or our `hf_server`, same wire format.

Prompts go out as token ids (truncated by the caller, who knows the budget; we never send
`truncate_prompt_tokens`), completions come back as token ids with the processed log-prob of each
sampled token, grouped prompt-major. Every reply is checked (ids parsed from `"token_id:N"` must
equal `token_ids`, one log-prob per id, `n` choices per prompt); a reply that fails is an error,
never silently repaired.

Failure policy (vllm-integration.md §7(b)): connection errors and 503 (server paused or still
loading) are retried with exponential back-off; a 4xx is never retried; a 500 is retried once and
then reported with the server's own message; a read timeout is reported at once. Every failure is
a `ServerError` whose message names host:port and what to check, including the server log when the
caller told us where it is.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Iterator, Sequence
from urllib.parse import urlparse

import httpx

from ebft_engine.rollout.protocol import BASE_MODEL_NAME, Completion, SamplingSpec


class ServerError(RuntimeError):
    """The generation server is unreachable, failed, or answered something we cannot use."""


class MalformedReplyError(ServerError):
    """The server answered 200 with a body that does not follow the protocol."""


@dataclass
class Timeouts:
    """Seconds. A completion request may take `read_base + max_tokens * read_per_token`, capped."""

    connect: float = 5.0
    read_base: float = 120.0
    read_per_token: float = 0.25
    """Per sampled token (max_tokens x prompts x n): generous, this only detects a stuck server."""
    read_cap: float = 900.0
    control: float = 120.0
    """Adapter loads, weight reloads, pause/resume."""

    def completion_read(self, max_tokens: int, n_prompts: int = 1, n: int = 1) -> float:
        tokens = max_tokens * max(1, n_prompts) * max(1, n)
        return min(self.read_cap, self.read_base + self.read_per_token * tokens)


class GenerationClient:
    """Talks to one generation server at `base_url` (e.g. `http://127.0.0.1:8000`)."""

    def __init__(self, base_url: str, timeouts: Timeouts | None = None, retries: int = 5,
                 backoff_s: float = 0.5, log_path: str | None = None, max_concurrent: int = 4,
                 token: str | None = None):
        """`token`: the run's server token, sent as `Authorization: Bearer` on every request
        (never logged, never part of an error message)."""
        self.base_url = base_url.rstrip("/")
        parsed = urlparse(self.base_url)
        self.hostport = parsed.netloc or self.base_url
        self.timeouts = timeouts or Timeouts()
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.log_path = log_path
        self.max_concurrent = max(1, int(max_concurrent))
        t = self.timeouts
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, trust_env=False, headers=headers,
                                  timeout=httpx.Timeout(t.control, connect=t.connect))
        self._pool: ThreadPoolExecutor | None = None

    # -- plumbing ------------------------------------------------------------------------------

    def _where(self) -> str:
        hint = f" Server log: {self.log_path}." if self.log_path else ""
        return (f"Check that the generation server is running and listening on {self.hostport} "
                f"(`python -m ebft_engine serve CONFIG`; trl.vllm_server_host / "
                f"trl.vllm_server_port must match).{hint}")

    def _request(self, method: str, path: str, *, json: dict | None = None,
                 params: dict | None = None, timeout: float | None = None,
                 retries: int | None = None) -> httpx.Response:
        retries = self.retries if retries is None else retries
        attempt, had_500 = 0, False
        to = httpx.Timeout(timeout or self.timeouts.control, connect=self.timeouts.connect)
        while True:
            problem = None
            try:
                r = self._http.request(method, path, json=json, params=params, timeout=to)
            except httpx.TimeoutException as e:
                if isinstance(e, httpx.ConnectTimeout):
                    problem = f"did not accept a connection within {self.timeouts.connect:.0f}s"
                else:
                    raise ServerError(
                        f"{method} {path}: no answer from the generation server at {self.hostport} "
                        f"within {to.read:.0f}s. The server may be stuck or overloaded. "
                        + self._where()) from e
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.WriteError) as e:
                problem = f"connection failed ({type(e).__name__}: {e})"
            else:
                if r.status_code == 503:
                    problem = f"answered 503 (paused or not ready): {_error_message(r)}"
                elif r.status_code >= 500:
                    if not had_500:
                        had_500 = True
                        time.sleep(self.backoff_s)
                        continue
                    raise ServerError(f"{method} {path} failed twice on the generation server at "
                                      f"{self.hostport} with HTTP {r.status_code}: "
                                      f"{_error_message(r)}. " + self._where())
                elif r.status_code == 401:
                    raise ServerError(f"{method} {path}: the generation server at {self.hostport} "
                                      "wants this run's token and did not get it (HTTP 401). Start "
                                      "server and trainer with `ebft run`, or give the trainer the "
                                      "server's token: EBFT_SERVER_TOKEN, or RUN_DIR/server.token in "
                                      "the same output_dir as the server's.")
                elif r.status_code >= 400:
                    raise ServerError(f"{method} {path} was refused by the generation server at "
                                      f"{self.hostport} with HTTP {r.status_code}: "
                                      f"{_error_message(r)}")
                else:
                    return r
            attempt += 1
            if attempt > retries:
                raise ServerError(f"{method} {path}: the generation server at {self.hostport} "
                                  f"{problem} (gave up after {attempt} tries). " + self._where())
            time.sleep(min(8.0, self.backoff_s * 2 ** (attempt - 1)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- health and models ---------------------------------------------------------------------

    def health(self) -> bool:
        try:
            r = self._http.get("/health", timeout=httpx.Timeout(5.0, connect=self.timeouts.connect))
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def wait_for_health(self, timeout: float = 600.0, proc=None, interval: float = 0.5) -> float:
        """Poll `GET /health` until 200; returns the seconds waited. Fails fast if `proc` (the
        server's Popen, when we started it) exits, and with a clear error after `timeout`."""
        t0 = time.monotonic()
        delay = interval
        while True:
            if self.health():
                return time.monotonic() - t0
            if proc is not None and proc.poll() is not None:
                raise ServerError(f"the generation server process exited with code "
                                  f"{proc.returncode} before answering /health on {self.hostport}."
                                  + _log_tail(self.log_path))
            waited = time.monotonic() - t0
            if waited >= timeout:
                raise ServerError(f"the generation server at {self.hostport} did not become healthy "
                                  f"within {timeout:.0f}s (GET /health). " + self._where()
                                  + _log_tail(self.log_path))
            time.sleep(min(delay, max(0.05, timeout - waited)))
            delay = min(2.0, delay * 1.5)

    def models(self) -> list[dict]:
        data = self._json(self._request("GET", "/v1/models"), "/v1/models")
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise MalformedReplyError(f"malformed reply from {self.hostport} to /v1/models: no "
                                      "'data' list")
        return items

    def base_model_name(self) -> str:
        """The served name of the base weights (the model without a parent)."""
        items = self.models()
        for m in items:
            if not m.get("parent"):
                return str(m.get("id"))
        return str(items[0].get("id")) if items else BASE_MODEL_NAME

    def max_model_len(self) -> int | None:
        for m in self.models():
            if not m.get("parent") and m.get("max_model_len"):
                return int(m["max_model_len"])
        return None

    def server_config(self) -> dict | None:
        """`vllm_config` of `GET /server_info?config_format=json` (vLLM dev mode, our hf server),
        or None when the server does not have the route or answers something else."""
        try:
            r = self._http.get("/server_info", params={"config_format": "json"},
                               timeout=httpx.Timeout(self.timeouts.control, connect=self.timeouts.connect))
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        try:
            config = r.json().get("vllm_config")
        except (ValueError, AttributeError):
            return None
        return config if isinstance(config, dict) else None

    def _json(self, r: httpx.Response, what: str):
        try:
            return r.json()
        except ValueError as e:
            raise MalformedReplyError(f"malformed reply from the generation server at "
                                      f"{self.hostport} to {what}: not JSON "
                                      f"({r.text[:200]!r})") from e

    # -- completions ---------------------------------------------------------------------------

    def completions(self, prompt_ids: Sequence[Sequence[int]], n: int,
                    max_tokens: int | Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
                    stop_token_ids: Sequence[int] = (), model: str | None = None, *,
                    top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
                    per_prompt: bool = False) -> list[Completion]:
        """n completions of each prompt, prompt-major (prompt 0's n samples first).

        `max_tokens` may be one value or one per prompt (adaptive max tokens); prompts sharing a
        value go in one request, several requests run concurrently."""
        out: list[Completion | None] = [None] * (len(prompt_ids) * n)
        for _idx, comps in self.completions_stream(prompt_ids, n, max_tokens, temperature, top_p,
                                                   stop_token_ids, model, top_k=top_k, min_p=min_p,
                                                   seed=seed, per_prompt=per_prompt):
            for c in comps:
                out[c.prompt_idx * n + c.sample_idx] = c
        assert all(c is not None for c in out)
        return out  # type: ignore[return-value]

    def completions_stream(self, prompt_ids: Sequence[Sequence[int]], n: int,
                           max_tokens: int | Sequence[int], temperature: float = 1.0,
                           top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
                           model: str | None = None, *, top_k: int = 0, min_p: float = 0.0,
                           seed: int | None = None, per_prompt: bool = False,
                           ) -> Iterator[tuple[list[int], list[Completion]]]:
        """Like `completions`, but yields (prompt indices, their completions) as each request
        finishes (`per_prompt=True`: one request per prompt, so groups arrive one by one)."""
        P = len(prompt_ids)
        if P == 0:
            return
        mts = [int(max_tokens)] * P if isinstance(max_tokens, int) else [int(m) for m in max_tokens]
        if len(mts) != P:
            raise ValueError(f"{len(mts)} max_tokens values for {P} prompts")
        batches: list[list[int]] = []
        if per_prompt:
            batches = [[i] for i in range(P)]
        else:
            by_mt: dict[int, list[int]] = {}
            for i, m in enumerate(mts):
                by_mt.setdefault(m, []).append(i)
            batches = list(by_mt.values())

        def run(idx: list[int]) -> tuple[list[int], list[Completion]]:
            spec = SamplingSpec(max_tokens=mts[idx[0]], temperature=temperature, top_p=top_p,
                                top_k=top_k, min_p=min_p, stop_token_ids=list(stop_token_ids),
                                seed=None if seed is None else seed + idx[0])
            comps = self._complete([list(prompt_ids[i]) for i in idx], n, spec, model)
            for c in comps:
                c.prompt_idx = idx[c.prompt_idx]
            return idx, comps

        if len(batches) == 1 or self.max_concurrent == 1:
            for b in batches:
                yield run(b)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_concurrent, thread_name_prefix="ebft-gen")
        futures = [self._pool.submit(run, b) for b in batches]
        try:
            for f in as_completed(futures):
                yield f.result()
        finally:
            for f in futures:
                f.cancel()

    def _complete(self, prompts: list[list[int]], n: int, spec: SamplingSpec,
                  model: str | None) -> list[Completion]:
        body = {"model": model or BASE_MODEL_NAME, "prompt": prompts, "n": int(n),
                **spec.to_request(), "logprobs": 0, "return_token_ids": True,
                "return_tokens_as_token_ids": True, "skip_special_tokens": False}
        timeout = self.timeouts.completion_read(spec.max_tokens, len(prompts), n)
        r = self._request("POST", "/v1/completions", json=body, timeout=timeout)
        return parse_completions(self._json(r, "/v1/completions"), len(prompts), n, body["model"],
                                 self.hostport, prompts)

    # -- adapters and weights ------------------------------------------------------------------

    def load_lora(self, name: str, path: str) -> None:
        self._request("POST", "/v1/load_lora_adapter",
                      json={"lora_name": name, "lora_path": str(path), "load_inplace": False})

    def unload_lora(self, name: str) -> None:
        self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})

    def reload_weights(self, weights_path: str) -> None:
        self._request("POST", "/collective_rpc", timeout=max(self.timeouts.control, 600.0),
                      json={"method": "reload_weights",
                            "kwargs": {"weights_path": str(weights_path)}})

    def pause(self, mode: str = "wait") -> None:
        self._request("POST", "/pause", params={"mode": mode}, timeout=self.timeouts.read_cap)

    def resume(self) -> None:
        self._request("POST", "/resume")

    def reset_prefix_cache(self, tries: int = 10) -> None:
        for _ in range(tries):
            r = self._request("POST", "/reset_prefix_cache")
            try:
                ok = r.json().get("success", True) if r.content else True
            except ValueError:
                ok = True
            if ok:
                return
            time.sleep(0.2)

    def update_weight_version(self, version: str) -> None:
        self._request("POST", "/update_weight_version", json={"new_version": version})


# ------------------------------------------------------------------------------------------------


def parse_completions(data, n_prompts: int, n: int, model: str, hostport: str = "server",
                      prompts: list[list[int]] | None = None) -> list[Completion]:
    """Check a `/v1/completions` reply and turn it into Completions (prompt-major order)."""

    def bad(detail: str) -> MalformedReplyError:
        return MalformedReplyError(
            f"malformed reply from the generation server at {hostport} to /v1/completions: "
            f"{detail}. ebft needs a vLLM server (`vllm serve` with --logprobs-mode "
            f"processed_logprobs) or `python -m ebft_engine serve`.")

    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise bad("no 'choices' list")
    choices = data["choices"]
    if len(choices) != n_prompts * n:
        raise bad(f"{len(choices)} choices for {n_prompts} prompts x n={n}")
    served = data.get("model") or model
    out: list[Completion] = []
    for pos, c in enumerate(choices):
        if not isinstance(c, dict):
            raise bad(f"choice {pos} is not an object")
        index = c.get("index", pos)
        if not isinstance(index, int) or not 0 <= index < n_prompts * n:
            raise bad(f"choice {pos} has index {index!r}")
        ids = c.get("token_ids")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise bad(f"choice {index} has no integer 'token_ids' (was return_token_ids honoured?)")
        lp = c.get("logprobs")
        if not isinstance(lp, dict):
            raise bad(f"choice {index} has no 'logprobs' object")
        values = lp.get("token_logprobs")
        tokens = lp.get("tokens")
        if not isinstance(values, list) or len(values) != len(ids):
            raise bad(f"choice {index}: {len(values) if isinstance(values, list) else 'no'} "
                      f"log-probs for {len(ids)} token ids")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise bad(f"choice {index}: a log-prob is not a number")
        if tokens is not None:
            if not isinstance(tokens, list) or len(tokens) != len(ids):
                raise bad(f"choice {index}: {len(tokens) if isinstance(tokens, list) else 'no'} "
                          f"tokens for {len(ids)} token ids")
            for t, tid in zip(tokens, ids):
                if not (isinstance(t, str) and t.startswith("token_id:")):
                    raise bad(f"choice {index}: token {t!r} is not 'token_id:N' "
                              "(was return_tokens_as_token_ids honoured?)")
                try:
                    parsed = int(t[len("token_id:"):])
                except ValueError:
                    raise bad(f"choice {index}: token {t!r} is not 'token_id:N'") from None
                if parsed != tid:
                    raise bad(f"choice {index}: token {t!r} disagrees with token id {tid}")
        reason = c.get("finish_reason")
        prompt_idx, sample_idx = divmod(index, n)
        echoed = c.get("prompt_token_ids")
        if prompts is not None and isinstance(echoed, list) and echoed and \
                echoed != prompts[prompt_idx]:
            raise bad(f"choice {index}: prompt_token_ids differ from prompt {prompt_idx} "
                      "(choices out of order?)")
        out.append(Completion(prompt_idx=prompt_idx, sample_idx=sample_idx, token_ids=list(ids),
                              logprobs=[float(v) for v in values],
                              finish_reason=str(reason) if reason else "length", model=str(served),
                              prompt_ids=list(prompts[prompt_idx]) if prompts else []))
    if sorted(c.prompt_idx * n + c.sample_idx for c in out) != list(range(n_prompts * n)):
        raise bad("choice indices are not 0..P*n-1")
    out.sort(key=lambda c: (c.prompt_idx, c.sample_idx))
    return out


def _error_message(r: httpx.Response) -> str:
    try:
        data = r.json()
    except ValueError:
        return r.text[:500] or r.reason_phrase
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("message"):
            return str(data["message"])
        if data.get("detail"):
            return str(data["detail"])
    return str(data)[:500]


def _log_tail(log_path: str | None, lines: int = 20) -> str:
    if not log_path:
        return ""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 16384))
            tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return f" (server log {log_path} not readable)"
    if not tail:
        return f" (server log {log_path} is empty)"
    return f"\nLast lines of {log_path}:\n" + "\n".join("  | " + t for t in tail)
