"""engine-math §10.1: the block-parallel forward + index map scores every generated token exactly
as if its block were run as its own causal sequence doc[:a_b] + ŷ_b; the plain shift does not."""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_tiny_llama
from ebft_engine.strided.layout import gen_region, make_layout, shift_pred_index, unfold_samples
from ebft_engine.strided.loss import gather_logprobs
from ebft_engine.strided.mask import dense_block_mask, forward_with_mask, lm_head

V = 97
TAU = 0.7


def _batch(lengths, prompts, S, stride, C, G, mcp=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (len(lengths), S), generator=g)
    for r, ell in enumerate(lengths):
        ids[r, ell:] = 0  # pad id: must never matter
    layout = make_layout(torch.tensor(lengths), None if prompts is None else torch.tensor(prompts), S,
                         stride=stride, context_length=C, generate_max_len=G, min_completion_prefix=mcp)
    gen = torch.randint(0, V, (len(lengths), layout.NB, G), generator=g)
    return ids, layout, gen


def _block_parallel_logp(model, ids, layout, gen, pred_index=None):
    seq = torch.cat([ids, gen_region(gen, layout)], dim=1)
    with torch.no_grad():
        hidden = forward_with_mask(model, seq, layout.position_ids, dense_block_mask(layout))
        logp, _ = gather_logprobs(hidden, lm_head(model), layout.pred_index if pred_index is None else pred_index,
                                  gen, temperature=TAU, chunk_size=7)
    return logp


def _per_block_reference(model, ids, layout, gen):
    """Each valid block as its own ordinary causal sequence (no custom mask, positions 0..)."""
    ref = torch.full(gen.shape, float("nan"))
    for r in range(layout.B):
        for b in range(layout.NB):
            if not layout.valid[r, b]:
                continue
            a = int(layout.anchors[r, b])
            seq = torch.cat([ids[r, :a], gen[r, b]]).unsqueeze(0)
            with torch.no_grad():
                logits = model(input_ids=seq).logits[0].float() / TAU
            lp = torch.log_softmax(logits[a - 1: a - 1 + layout.G], dim=-1)
            ref[r, b] = lp.gather(-1, gen[r, b].unsqueeze(-1)).squeeze(-1)
    return ref


CASES = {
    # name: (real lengths, prompt lengths, S, stride, context, G, min_completion_prefix)
    "8-8-8": ([64, 64], None, 64, 8, 8, 8, 0),
    "2-4-4": ([30, 30], None, 30, 2, 4, 4, 0),
    "3-5-6": ([33, 33], None, 33, 3, 5, 6, 0),
    "1-3-4 stride<G": ([20, 20], None, 20, 1, 3, 4, 0),
    "NB=1": ([12], None, 12, 8, 4, 8, 0),
    "padded rows": ([40, 27, 13, 6], None, 40, 3, 5, 4, 0),
    "prompt anchors": ([40, 36, 30], [10, 3, 22], 40, 2, 4, 4, 3),
}


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.mark.parametrize("case", list(CASES))
def test_block_parallel_equals_per_block_causal(model, case):
    lengths, prompts, S, stride, C, G, mcp = CASES[case]
    ids, layout, gen = _batch(lengths, prompts, S, stride, C, G, mcp)
    assert layout.n_valid_blocks > 0
    got = _block_parallel_logp(model, ids, layout, gen)
    ref = _per_block_reference(model, ids, layout, gen)
    valid = layout.valid.unsqueeze(-1).expand_as(got)
    assert torch.isfinite(got).all()  # invalid blocks compute finite garbage
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=0)

    # the ordinary shift (slot - 1) scores other tokens: wrong for every s = 0 token
    shifted = _block_parallel_logp(model, ids, layout, gen, pred_index=shift_pred_index(layout))
    first = valid.clone()
    first[..., 1:] = False
    assert ((shifted - ref).abs()[first] > 1e-3).all()
    if layout.NB > 1:
        assert ((shifted - ref).abs()[valid] > 1e-3).float().mean() > 0.9
    else:  # NB = 1: the shift is right exactly for s >= 1
        later = valid & ~first
        torch.testing.assert_close(shifted[later], ref[later], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["1-3-4 stride<G", "padded rows", "prompt anchors"])
def test_folded_samples_equal_per_block_causal_and_the_repeated_layout(model, case):
    """n samples as n·NB blocks of one row (what the stepper runs) score every token exactly as
    each block run alone, and exactly as the n-copies-of-the-document layout."""
    n = 3
    lengths, prompts, S, stride, C, G, mcp = CASES[case]
    ids, layout, _ = _batch(lengths, prompts, S, stride, C, G, mcp)
    folded = layout.fold(n)
    assert folded.NB == n * layout.NB and folded.T == S + n * layout.NB * G
    gen = torch.randint(0, V, (layout.B, folded.NB, G), generator=torch.Generator().manual_seed(5))
    got = _block_parallel_logp(model, ids, folded, gen)
    ref = _per_block_reference(model, ids, folded, gen)
    valid = folded.valid.unsqueeze(-1).expand_as(got)
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=0)

    rep = layout.repeat(n)
    gen_rep = unfold_samples(gen, n)  # [B·n, NB, G]: row r·n + j = sample j of document r
    seq = torch.cat([ids.repeat_interleave(n, dim=0), gen_region(gen_rep, layout)], dim=1)
    with torch.no_grad():
        hidden = forward_with_mask(model, seq, rep.position_ids, dense_block_mask(layout, repeat=n))
        logp_rep, _ = gather_logprobs(hidden, lm_head(model), rep.pred_index, gen_rep, temperature=TAU)
    valid_rep = rep.valid.unsqueeze(-1).expand_as(logp_rep)
    torch.testing.assert_close(unfold_samples(got, n)[valid_rep], logp_rep[valid_rep], atol=1e-4, rtol=0)
    assert torch.equal(unfold_samples(folded.valid, n), rep.valid)


def test_prompt_anchors_and_padding_rules():
    # per-row anchors: A_r = max(P_r + min_completion_prefix, C); raw rows (-1) use C
    layout = make_layout(torch.tensor([40, 36, 30, 9]), torch.tensor([10, -1, 22, 0]), 40, stride=2,
                         context_length=4, generate_max_len=4, min_completion_prefix=3)
    assert layout.row_anchor.tolist() == [13, 4, 25, 4]
    # NB_r = floor((l - G - A) / stride) + 1 from the real length
    assert layout.n_blocks.tolist() == [(40 - 4 - 13) // 2 + 1, (36 - 4 - 4) // 2 + 1, (30 - 4 - 25) // 2 + 1, 1]
    assert layout.NB == int(layout.n_blocks.max())
    a, valid = layout.anchors, layout.valid
    ell = layout.real_lengths.unsqueeze(1)
    assert (a[valid] + 4 <= ell.expand_as(a)[valid]).all()  # GT never touches padding
    assert (a < ell).all() and (a >= 1).all()  # anchors (also of invalid blocks) on real tokens
    # a row with no room gets no blocks; a batch with none has NB = 0 and T = S
    empty = make_layout(torch.tensor([5, 7]), None, 7, stride=1, context_length=4, generate_max_len=4)
    assert empty.NB == 0 and empty.T == 7 and empty.n_valid_blocks == 0
    assert dense_block_mask(empty).shape == (2, 1, 7, 7)


def test_step_major_slots_positions_and_index_map():
    layout = make_layout(torch.tensor([20]), None, 20, stride=3, context_length=5, generate_max_len=4)
    S, NB, G = layout.S, layout.NB, layout.G
    for b in range(NB):
        a = int(layout.anchors[0, b])
        assert a == 5 + 3 * b
        for s in range(G):
            slot = S + s * NB + b
            assert int(layout.gen_slots[b, s]) == slot
            assert int(layout.position_ids[0, slot]) == a + s
            assert int(layout.gt_positions[0, b, s]) == a + s
            assert int(layout.pred_index[0, b, s]) == (a - 1 if s == 0 else slot - NB)
    assert layout.position_ids[0, :S].tolist() == list(range(S))
    # gen_region / block_view are inverse
    tokens = torch.arange(NB * G).view(1, NB, G)
    region = gen_region(tokens, layout)
    assert region[0, layout.gen_slots[1, 2] - S] == tokens[0, 1, 2]


def test_plain_shift_scores_none_at_2048():
    """axolotl's shift at S = 2048, A = st = G = 8: 255 blocks, 2,040 tokens, 0 at the right place."""
    layout = make_layout(torch.tensor([2048]), None, 2048, stride=8, context_length=8, generate_max_len=8)
    assert layout.NB == 255 and layout.NB * layout.G == 2040
    right = (shift_pred_index(layout) == layout.pred_index).sum()
    assert int(right) == 0
