"""KV-cached block-parallel sampling of every block of a strided micro-batch.

Reference: `shared/notes/engine-math.md` §6. Both published implementations re-run the whole
growing sequence (document + every block's tokens so far) at each of the G steps. That is exact
but wasteful: documents never attend to generated tokens, so the document's keys and values never
change. Here:

1. **Prefill** the document once, causally, for the B documents (not B·n); its cache is then
   repeated for the n samples.
2. **Step 0** samples y(0, b) for every block from the prefill hidden state at a_b − 1.
3. **Steps s = 1..G−1** feed only the NB tokens y(s − 1, ·) (position ids a_b + s − 1) against
   the cache, with a small NB × (S + s·NB) mask (`mask.decode_step_mask`); the last step's tokens
   are never fed.

`generate_blocks_naive` is the full-recompute reference (the others' approach) with the same
sampling: tests compare the two token for token, the benchmark compares their speed. Both take the
lm_head only on the NB rows they sample from, so the difference measured is the caching.

Sampling: eval mode (LoRA dropout off), no grad, fp32 logits / τ, optional top-p (the top token
is always kept), inverse-CDF sampling with one uniform number per token. The uniforms come from
`noise` ([B·n, G, NB], for tests) or are drawn step by step from `generator` in the same order by
both generators, so equal logits give equal tokens. τ = 0 means argmax of the unscaled logits.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .layout import StridedLayout
from .mask import attention_for, decode_step_mask, decoder_body, dense_block_mask, forward_with_mask, lm_head


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    raise RuntimeError("the model returned no KV cache; it must support use_cache=True")


def _gather_rows(hidden: Tensor, index: Tensor) -> Tensor:
    """hidden [N, T, H], index [N, M] -> [N, M, H]."""
    return hidden.gather(1, index.unsqueeze(-1).expand(*index.shape, hidden.shape[-1]))


def sample_from_logits(
    logits: Tensor,
    *,
    temperature: float,
    top_p: float = 1.0,
    uniform: Tensor | None = None,
) -> Tensor:
    """Sample one token per row of `logits` [..., V] (fp32) with uniforms [...] in [0, 1).

    τ = 0 → argmax of the unscaled logits. top_p < 1 keeps the smallest set of most likely tokens
    whose mass reaches top_p (always at least the top token) and renormalises.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # the top token has 0 before it
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    cdf = probs.cumsum(-1)
    if uniform is None:
        uniform = torch.rand(cdf.shape[:-1], device=cdf.device)
    x = (uniform.clamp(0.0, 1.0 - 1e-7) * cdf[..., -1]).unsqueeze(-1).contiguous()
    # first index with cdf > x: a token of positive probability
    idx = torch.searchsorted(cdf.contiguous(), x, right=True).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)


class _EvalMode:
    """model.eval() for the duration (LoRA dropout off), restoring train mode after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


StepLogits = Callable[[int], Tensor]
"""s -> fp32 logits [B·n, NB, V] that token (s, ·) is sampled from (tokens of steps < s are set)."""


def _sample_blocks(
    model: nn.Module,
    input_ids: Tensor,
    layout: StridedLayout,
    start: Callable[[Tensor], StepLogits],
    *,
    n_samples: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    noise: Tensor | None,
    return_logits: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """The sampling loop both generators share: `start(tokens)` sets up a way of computing each
    step's logits (reading the tokens sampled so far); this loop draws the uniforms in one order
    and samples, so equal logits give equal tokens."""
    if temperature <= 0:
        warnings.warn("strided temperature 0: sampling is argmax of the unscaled logits, so all "
                      "n samples of a block are identical", stacklevel=3)
    B = input_ids.shape[0]
    N, NB, G = B * int(n_samples), layout.NB, layout.G
    device = input_ids.device
    tokens = torch.empty(N, NB, G, dtype=torch.long, device=device)
    all_logits = []
    if NB > 0:
        # sdpa/eager with dense masks for the whole generation, even when the model trains with flex
        with _EvalMode(model), attention_for(model, None):
            logits_at = start(tokens)
            for s in range(G):
                logits = logits_at(s)
                u = (noise[:, s].to(device=device, dtype=torch.float32) if noise is not None else
                     torch.rand((N, NB), generator=generator, device=device, dtype=torch.float32))
                tokens[:, :, s] = sample_from_logits(logits, temperature=temperature, top_p=top_p, uniform=u)
                if return_logits:
                    all_logits.append(logits)
    if not return_logits:
        return tokens
    if NB == 0:
        return tokens, torch.zeros(N, 0, G, 0, device=device)
    return tokens, torch.stack(all_logits, dim=2)


@torch.no_grad()
def generate_blocks(
    model: nn.Module,
    input_ids: Tensor,
    layout: StridedLayout,
    *,
    n_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample G tokens for every block, n_samples times per document, with a KV cache.

    Args:
        model: causal LM (or peft wrapper); run in eval mode, restored after.
        input_ids: [B, S] right-padded documents (the layout's rows).
        layout: `make_layout` of these rows.
        n_samples: samples per document; output row r·n + j is sample j of document r.
        temperature, top_p: sampling; τ = 0 → argmax (warns).
        generator: torch.Generator on the model's device for the uniforms (None: global RNG).
        noise: optional pre-drawn uniforms [B·n, G, NB] (overrides `generator`).
        return_logits: also return the fp32 logits [B·n, NB, G, V] each token was sampled from.

    Returns:
        tokens [B·n, NB, G] (block b's tokens in order), and the logits if asked.
    """
    n, S, NB = int(n_samples), input_ids.shape[1], layout.NB
    head = lm_head(model)

    def start(tokens: Tensor) -> StepLogits:
        # 1. prefill the B documents once, causally (right padding: real tokens never see pads)
        out = decoder_body(model)(
            input_ids=input_ids, position_ids=layout.position_ids[:, :S], use_cache=True)
        cache = _cache_of(out)
        h = _gather_rows(out.last_hidden_state, layout.anchors - 1)  # [B, NB, H]
        del out
        prefill_logits = head(h).float().repeat_interleave(n, dim=0)  # [N, NB, V]
        if n > 1:
            cache.batch_repeat_interleave(n)
        # [N, 1, NB, S + (G-1)·NB], converted once to an additive mask in the model's dtype (SDPA
        # would otherwise turn the boolean mask into one in every layer of every step); rows padded
        # to a multiple of 16 so every step's slice keeps the alignment fused CUDA kernels want
        allowed = decode_step_mask(layout, repeat=n)
        K = allowed.shape[-1]
        masks = torch.full((*allowed.shape[:-1], -(-K // 16) * 16), torch.finfo(h.dtype).min,
                           dtype=h.dtype, device=h.device)
        masks[..., :K].masked_fill_(allowed, 0.0)
        del allowed
        anchors = layout.anchors.repeat_interleave(n, dim=0)  # [N, NB]

        def logits_at(s: int) -> Tensor:
            if s == 0:  # 2. step 0 samples from the prefill logits
                return prefill_logits
            # 3. feed only the previous step's tokens, at positions a_b + s - 1
            hidden = forward_with_mask(model, tokens[:, :, s - 1], anchors + (s - 1),
                                       masks[..., : S + s * NB], cache=cache)
            return head(hidden).float()

        return logits_at

    return _sample_blocks(model, input_ids, layout, start, n_samples=n, temperature=temperature,
                          top_p=top_p, generator=generator, noise=noise, return_logits=return_logits)


@torch.no_grad()
def generate_blocks_naive(
    model: nn.Module,
    input_ids: Tensor,
    layout: StridedLayout,
    *,
    n_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The full-recompute reference: at every step s, run the whole sequence (B·n copies of the
    document + every block's s tokens so far, step-major) with a freshly built dense block mask,
    then sample from the index-map rows. Same arguments, randomness and output as
    `generate_blocks`."""
    n, S, NB = int(n_samples), input_ids.shape[1], layout.NB
    head = lm_head(model)
    rep = layout.repeat(n)
    docs = input_ids.repeat_interleave(n, dim=0)

    def start(tokens: Tensor) -> StepLogits:
        def logits_at(s: int) -> Tensor:
            T_s = S + s * NB
            gen = tokens[:, :, :s].transpose(1, 2).reshape(tokens.shape[0], s * NB)  # step-major
            seq = torch.cat([docs, gen], dim=1)
            mask = dense_block_mask(layout, repeat=n, length=T_s)
            hidden = forward_with_mask(model, seq, rep.position_ids[:, :T_s], mask)
            return head(_gather_rows(hidden, rep.pred_index[:, :, s])).float()

        return logits_at

    return _sample_blocks(model, input_ids, layout, start, n_samples=n, temperature=temperature,
                          top_p=top_p, generator=generator, noise=noise, return_logits=return_logits)
