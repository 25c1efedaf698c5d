"""Sampling for our transformers generation server: the distribution vLLM samples from, and a
KV-cached loop that draws n continuations of one prompt from it.

The returned log-probs are exactly `log_softmax(processed logits)` of the distribution each token
was drawn from (vLLM's `--logprobs-mode processed_logprobs`): temperature, then top-k, top-p and
min-p, renormalised.
"""

from __future__ import annotations

import torch

GREEDY_BELOW = 1e-5
"""Temperatures below this mean greedy decoding (as vLLM)."""



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
