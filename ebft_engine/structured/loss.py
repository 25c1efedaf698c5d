"""The GRPO / DAPO policy loss of structured mode, as pure functions of tensors.

TRL's GRPO with one iteration per rollout (engine-math.md §8): per completion token

    ρ = exp(logp − logp_old)                 (≡ 1 here: logp_old = logp.detach(); the gradient is ∇logp)
    w = clamp(exp(logp_old − logp_server), 1/cap, cap)
    ℓ = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) · w

`w` corrects for the server having sampled from slightly different weights or numerics; `ε_high`
above `ε_low` is DAPO's clip-higher. Reductions (`trl.loss_type`): `grpo` = token mean per
sequence, then the mean over the step's sequences; `bnpo` = token sum over the step's completion
tokens; `dr_grpo` = token sum / (sequences x max_completion_length). The normalisers count the
whole step, so micro-batch losses add up to the step's loss (gradient accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ebft_engine.config import EbftConfig


@dataclass(frozen=True)
class LossSettings:
    loss_type: str
    """grpo, bnpo or dr_grpo."""
    epsilon_low: float
    epsilon_high: float
    importance_cap: float
    max_completion_length: int

    @classmethod
    def from_config(cls, cfg: EbftConfig) -> LossSettings:
        t = cfg.trl
        return cls(loss_type=t.loss_type, epsilon_low=t.epsilon,
                   epsilon_high=t.epsilon_high if t.epsilon_high is not None else t.epsilon,
                   importance_cap=t.importance_sampling_cap,
                   max_completion_length=int(t.max_completion_length))


@dataclass
class ImportanceStats:
    """The raw importance weights exp(logp_old − logp_server) over completion tokens."""

    min: float
    max: float
    n_clipped: int
    """Tokens whose weight the cap changed."""


def completion_logprobs(logits: Tensor, positions: Tensor, tokens: Tensor,
                        temperature: float) -> tuple[Tensor, Tensor]:
    """(logp [B, C] of `tokens`, log-softmax [B, C, V]) at the logits rows `positions` [B, C],
    at the sampling temperature (the distribution the server sampled from)."""
    V = logits.shape[-1]
    selected = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, V)).float() / temperature
    logp_all = F.log_softmax(selected, dim=-1)
    return logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), logp_all


@torch.no_grad()
def entropy_sum(logp_all: Tensor, mask: Tensor) -> tuple[float, int]:
    """(sum of per-token entropies over `mask`, number of tokens) of log-softmax rows."""
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return float(entropy[mask].sum()), int(mask.sum())


def grpo_loss(logp: Tensor, server_logp: Tensor, mask: Tensor, advantages: Tensor,
              settings: LossSettings, *, n_sequences: int, n_tokens: int,
              old_logp: Tensor | None = None) -> tuple[Tensor, ImportanceStats]:
    """This micro-batch's part of the step loss, and its importance-weight statistics.

    logp, server_logp, mask: [B, C] (mask: real completion tokens); advantages: [B];
    n_sequences / n_tokens: the whole step's sequences / completion tokens (the normalisers);
    old_logp: the policy that sampled (default logp.detach(): one update per rollout)."""
    old = logp.detach() if old_logp is None else old_logp
    raw_w = torch.exp(old - server_logp)
    w = raw_w.clamp(1.0 / settings.importance_cap, settings.importance_cap)
    with torch.no_grad():
        stats = ImportanceStats(min=float(raw_w[mask].min()), max=float(raw_w[mask].max()),
                                n_clipped=int(((raw_w != w) & mask).sum()))
    ratio = torch.exp(logp - old)
    A = advantages.unsqueeze(-1)
    clipped = ratio.clamp(1 - settings.epsilon_low, 1 + settings.epsilon_high)
    per_tok = -torch.min(ratio * A, clipped * A) * w
    per_tok = per_tok * mask
    if settings.loss_type == "bnpo":
        loss = per_tok.sum() / max(1, n_tokens)
    elif settings.loss_type == "dr_grpo":
        loss = per_tok.sum() / (n_sequences * settings.max_completion_length)
    else:  # grpo: token mean per sequence, then mean over the step's sequences
        loss = (per_tok.sum(-1) / mask.sum(-1).clamp_min(1)).sum() / n_sequences
    return loss, stats
