"""Strided losses: chunked lm_head log-probs at the index map, the RL loss and the CE loss.

Reference: `shared/notes/engine-math.md` §5 (Index map, Temperature, Advantages on tokens, Losses,
lm_head in chunks).

The body runs once over the T = S + NB·G slots; the lm_head runs only on the rows that predict a
scored token (NB·G generated tokens per sequence, plus the CE positions), in chunks. Each chunk is
checkpointed: autograd would otherwise keep every chunk's fp32 rows × V log-softmax alive until
backward (at V = 128k, 2,040 rows × 4 sequences is 4 GB), while recomputing one chunk in backward
costs one more lm_head matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layout import StridedLayout


def _chunk_logprobs(head: nn.Module, h: Tensor, targets: Tensor, inv_temp: float) -> tuple[Tensor, Tensor]:
    logits = head(h).float()
    if inv_temp != 1.0:
        logits = logits * inv_temp
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def gather_logprobs(
    hidden: Tensor,
    lm_head: nn.Module,
    rows: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> tuple[Tensor, Tensor]:
    """log p(target) at chosen rows of the body's output, lm_head in checkpointed chunks.

    Args:
        hidden: [N, T, H] last hidden state of the decoder body.
        lm_head: the output projection (maybe LoRA-wrapped or tied).
        rows: [N, *M] slot indices whose hidden state predicts each target (the index map).
        targets: [N, *M] token ids.
        temperature: log-probs of log_softmax(logits / τ) in fp32; τ ≤ 0 (argmax sampling) and
            τ = 1 use the unscaled logits.
        chunk_size: rows per lm_head call.

    Returns:
        (logp [N, *M] fp32 with grad, entropy [N, *M] fp32 detached: the entropy of the same
        tempered distribution, for the `entropy` metric).
    """
    N = hidden.shape[0]
    H = hidden.shape[-1]
    shape = rows.shape
    flat_rows = rows.reshape(N, -1)
    h = hidden.gather(1, flat_rows.unsqueeze(-1).expand(N, flat_rows.shape[1], H)).reshape(-1, H)
    tgt = targets.reshape(-1).to(hidden.device)
    inv_temp = 1.0 / temperature if temperature > 0 else 1.0
    logps, ents = [], []
    use_ckpt = torch.is_grad_enabled() and h.requires_grad
    for start in range(0, h.shape[0], max(int(chunk_size), 1)):
        hc, tc = h[start : start + chunk_size], tgt[start : start + chunk_size]
        if use_ckpt:
            lp, ent = checkpoint(_chunk_logprobs, lm_head, hc, tc, inv_temp, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(lm_head, hc, tc, inv_temp)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = torch.zeros(shape, device=hidden.device)
        return empty, empty
    return torch.cat(logps).reshape(shape), torch.cat(ents).reshape(shape).detach()


def masked_mean_per_sequence(values: Tensor, mask: Tensor) -> Tensor:
    """Per sequence (dim 0) masked mean over all other dims, then the mean over the sequences
    that have at least one unmasked element (0 if none has)."""
    m = mask.to(values.dtype).reshape(values.shape[0], -1)
    v = values.reshape(values.shape[0], -1)
    count = m.sum(-1)
    per_seq = (v * m).sum(-1) / count.clamp_min(1.0)
    has = count > 0
    if not bool(has.any()):
        return (v * m).sum()  # a zero that keeps the graph
    return per_seq[has].mean()


def rl_loss(logp: Tensor, adv: Tensor, valid: Tensor) -> Tensor:
    """The strided policy-gradient loss (DECISION, reference): per sequence, the mean of −A_b·logp
    over the tokens of its valid blocks, then the mean over the sequences.

    Args:
        logp: [N, NB, G] log-probs of the sampled tokens (at the index map, with temperature).
        adv: [N, NB] block advantages (detached).
        valid: [N, NB] bool.
    """
    G = logp.shape[-1]
    per_token = -adv.detach().unsqueeze(-1).to(logp.dtype) * logp
    mask = valid.unsqueeze(-1).expand(-1, -1, G)
    return masked_mean_per_sequence(per_token, mask)


def ce_loss(logp: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy on ground-truth tokens: −log p (τ = 1), per-sequence masked mean, then the
    batch mean. `logp` and `mask` are [N, M] (see `ce_positions`)."""
    return masked_mean_per_sequence(-logp, mask)


def ce_positions(labels: Tensor, real_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where the CE terms of right-padded documents are: targets at t ≥ 1 with labels[t] ≠ −100
    (raw text: every real token after the first; prompt/completion: completion tokens), predicted
    from slot t − 1. Never pads (labels must be −100 there; real_lengths enforces it anyway) and
    never generated slots.

    Returns (rows [N, S−1], targets [N, S−1], mask [N, S−1]); masked entries point at valid slots.
    """
    N, S = labels.shape
    t = torch.arange(1, S, device=labels.device)
    tgt = labels[:, 1:]
    mask = (tgt != -100) & (t.unsqueeze(0) < real_lengths.to(labels.device).unsqueeze(1))
    rows = (t - 1).unsqueeze(0).expand(N, S - 1)
    return rows, torch.where(mask, tgt, torch.zeros_like(tgt)), mask


def expand_block_advantages(adv: Tensor, layout: StridedLayout, valid: Tensor | None = None) -> Tensor:
    """Block advantages [N, NB] on their slots: [N, T] with A_b on exactly block b's G generated
    slots (slot S + s·NB + b, i.e. the NB values tiled G times) and 0 on the document, padding and
    invalid blocks. `valid` [N, NB] defaults to the layout's (repeated when N = B·n)."""
    N = adv.shape[0]
    if valid is None:
        valid = layout.valid
        if valid.shape[0] != N:
            valid = valid.repeat_interleave(N // valid.shape[0], dim=0)
    per_block = torch.where(valid, adv, torch.zeros_like(adv))
    doc = torch.zeros(N, layout.S, dtype=adv.dtype, device=adv.device)
    return torch.cat([doc, per_block.repeat(1, layout.G)], dim=1)
