"""Where every token of a strided micro-batch lives: anchors, step-major slots, positions, index map.

Reference: `shared/notes/engine-math.md` §5. A strided row is one document of S (padded) tokens.
Blocks of G generated tokens start at anchors a_b = A_r + b·stride inside it; the generated tokens
are appended after the document **step-major**: token s of block b sits at slot

    pos(s, b) = S + s·NB + b            (s = ⌊(slot − S)/NB⌋, b = (slot − S) mod NB)

with position id a_b + s, the position of the ground-truth token it stands in for. One forward over
the T = S + NB·G slots with the block mask (`mask.py`) then computes every block as if it were its
own sequence doc[:a_b] + ŷ_b.

**Anchors are per row** (engine-math §5 allows one A per micro-batch; per-row anchors lose no
blocks when prompt lengths differ): A_r = C for raw text, max(P_r + min_completion_prefix, C) for
prompt/completion rows. NB_r = ⌊(ℓ_r − G − A_r)/stride⌋ + 1 from the *real* length ℓ_r; the batch
lays out NB = max_r NB_r blocks and block b of row r is valid iff b < NB_r, which implies
a_b + G ≤ ℓ_r: ground truth never touches padding. Invalid blocks are laid out (the tensors stay
rectangular) with their anchor clamped into the row's real tokens, so they compute finite garbage
that every consumer masks out through `valid`. Rows are right-padded (real tokens first).

**The index map.** Token (s, b) is predicted by the hidden state at slot a_b − 1 (the last
document token before the anchor) for s = 0 and at slot pos(s − 1, b) for s ≥ 1. The ordinary
shift (slot − 1) is another block's token for every s = 0 and for s ≥ 1 whenever NB > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StridedLayout:
    """Index tensors for one micro-batch of B documents (all long/bool, on one device).

    Tensors indexed by block use the shape [B, NB, G] (block, then step) to match the sampled
    tokens `[B·n, NB, G]`; slots are ordered step-major as described in the module docstring.
    """

    S: int
    """Padded document length (slots 0..S−1)."""
    NB: int
    """Blocks laid out per row (max over rows; 0 when no row has room for a block)."""
    G: int
    """Tokens generated per block (`generate_max_len`)."""
    stride: int
    context_length: int
    window: int | None
    """Opt-in sliding context window for generated queries (rule 2 of the mask only), else None."""
    real_lengths: Tensor
    """[B] real (non-pad) tokens per row; rows are right-padded."""
    row_anchor: Tensor
    """[B] A_r, the first anchor of each row."""
    n_blocks: Tensor
    """[B] NB_r ≥ 0, the valid blocks of each row."""
    anchors: Tensor
    """[B, NB] a_b (clamped into the real tokens for invalid blocks)."""
    valid: Tensor
    """[B, NB] bool: block b of row r is real (b < NB_r)."""
    position_ids: Tensor
    """[B, T]: t for document slot t, a_b + s for slot pos(s, b)."""
    gen_slots: Tensor
    """[NB, G]: pos(s, b) = S + s·NB + b (the same for every row)."""
    pred_index: Tensor
    """[B, NB, G]: the slot whose hidden state predicts token (s, b)."""
    gt_positions: Tensor
    """[B, NB, G]: a_b + s, the document position of the ground-truth token (clamped to S − 1
    for invalid blocks)."""

    @property
    def B(self) -> int:
        return int(self.real_lengths.shape[0])

    @property
    def T(self) -> int:
        return self.S + self.NB * self.G

    @property
    def device(self) -> torch.device:
        return self.real_lengths.device

    @property
    def n_valid_blocks(self) -> int:
        return int(self.valid.sum())

    def slot_vectors(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per-slot (is_doc [T] bool, step [T] long, block [T] long); step = block = −1 on the document."""
        t = torch.arange(self.T, device=self.device)
        is_doc = t < self.S
        j = (t - self.S).clamp_min(0)
        nb = max(self.NB, 1)
        step = torch.where(is_doc, torch.full_like(t, -1), j // nb)
        block = torch.where(is_doc, torch.full_like(t, -1), j % nb)
        return is_doc, step, block

    def slot_anchor(self) -> Tensor:
        """[B, T]: the anchor of the block each generated slot belongs to; S for document slots
        (never read there)."""
        B = self.B
        doc = torch.full((B, self.S), self.S, dtype=torch.long, device=self.device)
        if self.NB == 0:
            return doc
        # step-major: slot S + s·NB + b holds block b -> the NB anchors tiled G times
        return torch.cat([doc, self.anchors.repeat(1, self.G)], dim=1)

    def doc_real(self) -> Tensor:
        """[B, S] bool: real document tokens (right padding)."""
        t = torch.arange(self.S, device=self.device)
        return t.unsqueeze(0) < self.real_lengths.unsqueeze(1)

    def fold(self, n: int) -> "StridedLayout":
        """The n samples of each document as n·NB blocks of **one** row: block j·NB + b is sample
        j of block b (anchor a_b). Blocks never see each other, so each sample is computed
        exactly as in `repeat(n)`, but the document is laid out and run once instead of n times
        (the training and feature forwards shrink from B·n·(S + NB·G) to B·(S + n·NB·G) tokens).
        `unfold_samples` turns per-block results back into [B·n, NB, ...]."""
        if n == 1:
            return self
        return _with_slots(S=self.S, G=self.G, stride=self.stride, context_length=self.context_length,
                           window=self.window, real_lengths=self.real_lengths, row_anchor=self.row_anchor,
                           n_blocks=self.n_blocks * n, anchors=self.anchors.repeat(1, n),
                           valid=self.valid.repeat(1, n))

    def repeat(self, n: int) -> "StridedLayout":
        """The same layout with every row repeated n times (row r·n + j is sample j of document r),
        the batch the n samples per document are laid out in."""
        if n == 1:
            return self
        rep = lambda x: x.repeat_interleave(n, dim=0)  # noqa: E731
        return StridedLayout(
            S=self.S, NB=self.NB, G=self.G, stride=self.stride, context_length=self.context_length,
            window=self.window, real_lengths=rep(self.real_lengths), row_anchor=rep(self.row_anchor),
            n_blocks=rep(self.n_blocks), anchors=rep(self.anchors), valid=rep(self.valid),
            position_ids=rep(self.position_ids), gen_slots=self.gen_slots,
            pred_index=rep(self.pred_index), gt_positions=rep(self.gt_positions),
        )


def row_anchors(
    prompt_lengths: Tensor | None,
    B: int,
    *,
    context_length: int,
    min_completion_prefix: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """A_r = C for raw text (no prompt length or a negative one), max(P_r + min_completion_prefix, C)
    for prompt/completion rows."""
    C = int(context_length)
    if prompt_lengths is None:
        return torch.full((B,), C, dtype=torch.long, device=device)
    P = torch.as_tensor(prompt_lengths, dtype=torch.long, device=device)
    with_prompt = P >= 0
    return torch.where(with_prompt, (P + int(min_completion_prefix)).clamp_min(C), torch.full_like(P, C))


def make_layout(
    real_lengths: Tensor,
    prompt_lengths: Tensor | None,
    S: int,
    *,
    stride: int,
    context_length: int,
    generate_max_len: int,
    min_completion_prefix: int = 0,
    sliding_window: int | None = None,
) -> StridedLayout:
    """Build the layout of a right-padded micro-batch.

    Args:
        real_lengths: [B] real tokens per row (ℓ_r ≤ S).
        prompt_lengths: [B] P_r (index of the first completion token), −1 for a raw-text row; or
            None when every row is raw text (A = C).
        S: padded row length.
        stride, context_length, generate_max_len: `ebft.stride`, `ebft.context_length`, G.
        min_completion_prefix: tokens into the completion before the first anchor.
        sliding_window: opt-in window W: generated queries then see only document keys
            a_b − W ≤ k < a_b (attention only; earlier text still flows in through the document
            states). None = the whole prefix (the paper's behaviour).
    """
    if stride < 1 or context_length < 1 or generate_max_len < 1:
        raise ValueError(
            f"strided mode needs stride, context_length and generate_max_len >= 1; got "
            f"{stride}, {context_length}, {generate_max_len}"
        )
    if sliding_window is not None and int(sliding_window) < 1:
        raise ValueError(f"sliding context window must be >= 1 token, got {sliding_window}")
    lengths = torch.as_tensor(real_lengths, dtype=torch.long)
    device = lengths.device
    B = int(lengths.shape[0])
    G = int(generate_max_len)
    if B and int(lengths.max()) > S:
        raise ValueError(f"a real length ({int(lengths.max())}) exceeds the padded length S = {S}")

    A = row_anchors(prompt_lengths, B, context_length=context_length,
                    min_completion_prefix=min_completion_prefix, device=device)
    room = lengths - G - A
    # floor division of a negative number would give -1 -> 0 blocks too, but be explicit
    n_blocks = torch.where(room >= 0, torch.div(room, stride, rounding_mode="floor") + 1,
                           torch.zeros_like(room))
    NB = int(n_blocks.max()) if B else 0

    b = torch.arange(NB, device=device)
    raw = A.unsqueeze(1) + b.unsqueeze(0) * stride  # [B, NB]
    valid = b.unsqueeze(0) < n_blocks.unsqueeze(1)
    # invalid blocks: keep the anchor inside the real tokens (>= 1 so a_b - 1 is a slot) so their
    # positions stay small and their keys real; their outputs are masked everywhere
    safe = raw.clamp(max=(lengths - 1).clamp_min(1).unsqueeze(1)).clamp_min(1)
    anchors = torch.where(valid, raw, safe)

    return _with_slots(S=int(S), G=G, stride=int(stride), context_length=int(context_length),
                       window=None if sliding_window is None else int(sliding_window),
                       real_lengths=lengths, row_anchor=A, n_blocks=n_blocks, anchors=anchors, valid=valid)


def _with_slots(*, S: int, G: int, stride: int, context_length: int, window: int | None,
                real_lengths: Tensor, row_anchor: Tensor, n_blocks: Tensor, anchors: Tensor,
                valid: Tensor) -> StridedLayout:
    """Everything that follows from the anchors: slots, position ids, index map, GT positions."""
    device = anchors.device
    B, NB = anchors.shape
    s = torch.arange(G, device=device)
    b = torch.arange(NB, device=device)
    gen_slots = S + s.unsqueeze(0) * NB + b.unsqueeze(1)  # [NB, G]
    gt = anchors.unsqueeze(-1) + s.view(1, 1, G)  # [B, NB, G]
    prev_slot = (gen_slots - NB).unsqueeze(0).expand(B, NB, G)  # pos(s-1, b)
    pred_index = torch.where(s.view(1, 1, G) == 0, (anchors - 1).unsqueeze(-1).expand(B, NB, G),
                             prev_slot)

    doc_pos = torch.arange(S, device=device).expand(B, S)
    # slot S + s·NB + b -> a_b + s: [B, G, NB] flattened step-major
    gen_pos = (anchors.unsqueeze(1) + s.view(1, G, 1)).reshape(B, G * NB)
    position_ids = torch.cat([doc_pos, gen_pos], dim=1)

    return StridedLayout(
        S=S, NB=NB, G=G, stride=stride, context_length=context_length, window=window,
        real_lengths=real_lengths, row_anchor=row_anchor, n_blocks=n_blocks, anchors=anchors,
        valid=valid, position_ids=position_ids, gen_slots=gen_slots, pred_index=pred_index,
        gt_positions=gt.clamp(max=max(S - 1, 0)),
    )


def fold_sample_rows(per_sample: Tensor, n: int) -> Tensor:
    """[B·n, NB, ...] (row r·n + j = sample j of document r) -> [B, n·NB, ...] of a `fold(n)`
    layout (block j·NB + b). The inverse of `unfold_samples`."""
    N, NB = per_sample.shape[:2]
    return per_sample.reshape(N // n, n * NB, *per_sample.shape[2:])


def unfold_samples(per_block: Tensor, n: int) -> Tensor:
    """[B, n·NB, ...] of a `fold(n)` layout -> [B·n, NB, ...] (row r·n + j = sample j of
    document r), the shape the rewards, advantages and losses use."""
    B, nNB = per_block.shape[:2]
    return per_block.reshape(B * n, nNB // n, *per_block.shape[2:])


def shift_pred_index(layout: StridedLayout) -> Tensor:
    """[B, NB, G]: the ordinary causal shift (slot − 1) for every generated token. Wrong (see the
    module docstring); kept for the tests that show how wrong, and for comparing with axolotl."""
    return (layout.gen_slots - 1).unsqueeze(0).expand(layout.B, -1, -1)


def gen_region(tokens: Tensor, layout: StridedLayout) -> Tensor:
    """Lay sampled tokens [N, NB, G] out step-major: [N, NB·G] for slots S..T−1."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], layout.NB * layout.G)


def block_view(slot_values: Tensor, layout: StridedLayout) -> Tensor:
    """Inverse of `gen_region` for per-slot values [N, T, ...] -> [N, NB, G, ...] (generated slots)."""
    N = slot_values.shape[0]
    gen = slot_values[:, layout.S:]
    rest = gen.shape[2:]
    return gen.reshape(N, layout.G, layout.NB, *rest).transpose(1, 2)
