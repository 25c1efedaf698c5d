"""What a structured step passes between its parts: prompt groups, feature sequences, padding.

A `Group` is one prompt and its n completions, as the rollout part assembles them; the scoring
part reads its feature sequences (`gen_feats`, `gt_feat`), the loss part its turn-1 token ids and
the server's log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class StructuredError(RuntimeError):
    """A row or setting structured mode cannot use; the message says which and what to do."""


@dataclass
class FeatSeq:
    """A sequence for the feature pass: token ids and which of them are completion tokens."""

    ids: list[int]
    completion: list[bool]


@dataclass
class Group:
    """One prompt, its n completions (turn 1 carries the loss) and the feature sequences."""

    row_index: int
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    """Turn-1 ids as sampled, stop id included (the loss learns to stop)."""
    server_logprobs: list[list[float]]
    finish_reasons: list[str]
    gen_feats: list[FeatSeq]
    gt_feat: FeatSeq
    turns: int = 1
    requests: list[list[int]] = field(default_factory=list)


def pad(seqs: list[list[int]], masks: list[list[bool]] | None, pad_id: int, device: torch.device):
    """Right-pad to [B, L]: ids, real-token mask, and the completion mask (or None)."""
    L = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    comp = torch.zeros(B, L, dtype=torch.bool) if masks is not None else None
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        real[b, :len(s)] = True
        if comp is not None:
            comp[b, :len(s)] = torch.tensor(masks[b], dtype=torch.bool)
    return ids.to(device), real.to(device), (comp.to(device) if comp is not None else None)
