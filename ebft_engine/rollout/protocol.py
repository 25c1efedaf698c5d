"""What travels between the trainer and the generation server, as plain dataclasses.

The wire format is vLLM's OpenAI-compatible `/v1/completions` (token-id prompts, `n`, processed
log-probs of the sampled tokens, `return_token_ids`), so the same client talks to `vllm serve`
and to our transformers server (`hf_server.py`). See `shared/notes/vllm-integration.md` §3.3, §7.
No torch here: the client and its tests stay light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BASE_MODEL_NAME = "ebft-base"
"""Served name of the base weights (`--served-model-name`)."""
POLICY_PREFIX = "ebft-policy-v"
"""LoRA adapters are served as `ebft-policy-v{N}`, N = optimizer updates contained in them."""

_POLICY_RE = re.compile(r"^ebft-policy-v(\d+)$")


def policy_name(version: int) -> str:
    """Served name of the adapter that holds `version` optimizer updates."""
    return f"{POLICY_PREFIX}{int(version)}"


def policy_version(model_name: str | None) -> int:
    """Number of optimizer updates in the weights served under `model_name` (base = 0)."""
    m = _POLICY_RE.match(model_name or "")
    return int(m.group(1)) if m else 0


@dataclass
class SamplingSpec:
    """Sampling parameters of one `/v1/completions` request."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 = off (vLLM)."""
    min_p: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def to_request(self) -> dict:
        body = {
            "max_tokens": int(self.max_tokens),
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k) if self.top_k and self.top_k > 0 else -1,
            "min_p": float(self.min_p),
            "stop_token_ids": [int(t) for t in self.stop_token_ids],
        }
        if self.seed is not None:
            body["seed"] = int(self.seed)
        return body


@dataclass
class Completion:
    """One sampled continuation of one prompt, as the server returned it."""

    prompt_idx: int
    """Index of the prompt in the request's prompt list (choices are prompt-major)."""
    sample_idx: int
    """0..n-1 within the prompt's group."""
    token_ids: list[int]
    """Generated ids, including a final stop/EOS id when finish_reason is "stop"."""
    logprobs: list[float]
    """Processed log-prob (sampling distribution, after temperature/top-k/top-p) of each id."""
    finish_reason: str
    """"stop" (stop/EOS id sampled) or "length" (max_tokens reached)."""
    model: str
    """Served model name the sample came from (`ebft-base` or `ebft-policy-vN`)."""
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def policy_version(self) -> int:
        return policy_version(self.model)


class ApiError(Exception):
    """An error our server answers with vLLM's body shape
    (`{"error": {"message", "type", "param", "code"}}`)."""

    TYPES = {400: "BadRequestError", 401: "UnauthorizedError", 403: "ForbiddenError",
             404: "NotFoundError", 413: "RequestTooLargeError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}
