"""The backward passes of one structured step: its completions in micro-batches through the
trained model, the GRPO loss of each (`loss.py`), gradients accumulated for one optimizer step.

Micro-batches of `micro_batch_size` sequences; with `skip_zero_advantage_batches` a micro-batch
whose advantages are all zero is skipped (no forward, no gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ebft_engine.structured.groups import Group, pad
from ebft_engine.structured.loss import LossSettings, completion_logprobs, entropy_sum, grpo_loss


@dataclass
class MicroBatch:
    """Tensors of one micro-batch's completions: [B, C] unless noted."""

    ids: torch.Tensor
    """[B, L] prompt + completion ids, right-padded."""
    real: torch.Tensor
    """[B, L] real-token mask."""
    positions: torch.Tensor
    """Logits rows predicting each completion token."""
    tokens: torch.Tensor
    mask: torch.Tensor
    server_logp: torch.Tensor


def micro_batch(prompts: list[list[int]], completions: list[list[int]], server: list[list[float]],
                pad_id: int, device: torch.device) -> MicroBatch:
    ids, real, _ = pad([p + c for p, c in zip(prompts, completions)], None, pad_id, device)
    B, C = len(completions), max(len(c) for c in completions)
    pos = torch.zeros(B, C, dtype=torch.long, device=device)
    tok = torch.zeros(B, C, dtype=torch.long, device=device)
    cmask = torch.zeros(B, C, dtype=torch.bool, device=device)
    old_server = torch.zeros(B, C, dtype=torch.float32, device=device)
    for b, (p, c, lp) in enumerate(zip(prompts, completions, server)):
        L = len(c)
        pos[b, :L] = torch.arange(len(p) - 1, len(p) - 1 + L, device=device)
        tok[b, :L] = torch.tensor(c, device=device)
        cmask[b, :L] = True
        old_server[b, :L] = torch.tensor(lp, dtype=torch.float32, device=device)
    return MicroBatch(ids, real, pos, tok, cmask, old_server)


def backward_groups(model: Any, groups: list[Group], adv: torch.Tensor, settings: LossSettings, *,
                    micro_batch_size: int, temperature: float, pad_id: int, device: torch.device,
                    skip_zero: bool) -> tuple[dict[str, float], int, bool]:
    """Backpropagate the step's loss over `groups` (adv: [G, n]); returns (metrics, tokens
    through the model, whether every micro-batch was skipped)."""
    samples = [(gi, j) for gi in range(len(groups)) for j in range(adv.shape[1])]
    n_seq = len(samples)
    n_tok_total = sum(len(groups[gi].completion_ids[j]) for gi, j in samples)
    loss_sum, ent_sum, ent_count = 0.0, 0.0, 0
    is_min, is_max, clipped_w = math.inf, -math.inf, 0
    n_tokens, n_skipped, n_mb = 0, 0, 0
    model.train()
    for s in range(0, n_seq, micro_batch_size):
        mb = samples[s:s + micro_batch_size]
        n_mb += 1
        a = torch.stack([adv[gi, j] for gi, j in mb]).to(device, torch.float32)
        if skip_zero and bool((a == 0).all()):
            n_skipped += 1
            continue
        batch = micro_batch([groups[gi].prompt_ids for gi, _ in mb],
                            [groups[gi].completion_ids[j] for gi, j in mb],
                            [groups[gi].server_logprobs[j] for gi, j in mb], pad_id, device)
        n_tokens += int(batch.real.sum())
        logits = model(input_ids=batch.ids, attention_mask=batch.real.long()).logits
        logp, logp_all = completion_logprobs(logits, batch.positions, batch.tokens, temperature)
        ent, count = entropy_sum(logp_all, batch.mask)
        ent_sum, ent_count = ent_sum + ent, ent_count + count
        loss, stats = grpo_loss(logp, batch.server_logp, batch.mask, a, settings,
                                n_sequences=n_seq, n_tokens=n_tok_total)
        is_min, is_max, clipped_w = min(is_min, stats.min), max(is_max, stats.max), clipped_w + stats.n_clipped
        loss.backward()
        loss_sum += float(loss.detach())
    metrics = {
        "loss": loss_sum,
        "entropy": ent_sum / ent_count if ent_count else math.nan,
        "is_ratio_min": is_min if math.isfinite(is_min) else math.nan,
        "is_ratio_max": is_max if math.isfinite(is_max) else math.nan,
        "is_clipped_frac": clipped_w / ent_count if ent_count else 0.0,
        "skipped_microbatches": float(n_skipped),
        "zero_adv_frac": float((adv == 0).float().mean()),
    }
    return metrics, n_tokens, n_mb > 0 and n_skipped == n_mb
