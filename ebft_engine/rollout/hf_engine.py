"""The generation engine behind our transformers server (`hf_server.py` is its HTTP surface).

`ServerState` holds the served model (the base weights, its peft wrapper once an adapter is
loaded, the adapters by name) and answers vLLM's requests as plain dicts: completions (token-id
prompts, n samples each, vLLM's sampling fields and response shape), LoRA loads and unloads,
in-place weight reloads. One request at a time holds the model (a lock). Bad requests raise
`ApiError` with vLLM's status codes and error body.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ebft_engine.rollout.hf_sampling import sample_group
from ebft_engine.rollout.protocol import BASE_MODEL_NAME


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


@dataclass
class ServerState:
    """The served model: base weights, their peft wrapper once an adapter is loaded, the adapters
    by name; its methods answer vLLM's requests (body dict in, response dict out)."""

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
