"""Strided losses: advantage placement (engine-math §10.3), chunked lm_head log-probs, RL and CE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ebft_engine.strided.layout import block_view, make_layout
from ebft_engine.strided.loss import (ce_loss, ce_positions, expand_block_advantages, gather_logprobs,
                                      rl_loss)


def test_advantages_land_on_exactly_their_block_tokens():
    # rows of different lengths -> invalid blocks in the shorter row; n = 2 samples per document
    layout = make_layout(torch.tensor([30, 19]), None, 30, stride=3, context_length=4, generate_max_len=5)
    n, NB, G, S = 2, layout.NB, layout.G, layout.S
    assert not layout.valid.all()
    adv = (torch.arange(2 * n * NB, dtype=torch.float32).view(2 * n, NB) + 1.0) * 0.5  # distinct, non-zero
    out = expand_block_advantages(adv, layout)
    valid = layout.valid.repeat_interleave(n, dim=0)
    assert out.shape == (2 * n, layout.T)
    assert (out[:, :S] == 0).all()  # document and padding slots
    for r in range(2 * n):
        for b in range(NB):
            slots = layout.gen_slots[b]  # S + s·NB + b
            want = adv[r, b] if valid[r, b] else 0.0
            assert (out[r, slots] == want).all()
            # and no other slot holds this block's value
            assert int((out[r] == adv[r, b]).sum()) == (G if valid[r, b] else 0)
    # the inverse view gives [N, NB, G] = A_b broadcast over its G tokens
    per_token = block_view(out, layout)
    torch.testing.assert_close(per_token, torch.where(valid, adv, 0.0).unsqueeze(-1).expand(-1, -1, G))
    # axolotl's interleaved repeat (A_0 ×G, A_1 ×G, ...) would put block 0's value on other blocks' slots
    interleaved = adv.repeat_interleave(G, dim=1)
    assert not torch.equal(interleaved, out[:, S:])


@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_chunked_logprobs_equal_full_logits_with_gradients(temperature):
    torch.manual_seed(0)
    N, T, H, V = 3, 11, 16, 50
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(N, T, H, requires_grad=True)
    rows = torch.randint(0, T, (N, 4, 5))
    targets = torch.randint(0, V, (N, 4, 5))

    logp, ent = gather_logprobs(hidden, head, rows, targets, temperature=temperature, chunk_size=7)
    (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
    g_hidden, g_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    tau = temperature if temperature > 0 else 1.0
    logits = head(hidden).float() / tau  # the whole [N, T, V]
    full = F.log_softmax(logits, -1)
    idx = rows.view(N, -1)
    picked = full.gather(1, idx.unsqueeze(-1).expand(N, idx.shape[1], V)).view(N, 4, 5, V)
    ref = picked.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()

    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, g_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, g_head, atol=1e-5, rtol=1e-5)
    ref_ent = -(picked.exp() * picked).sum(-1)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad


def test_rl_loss_is_per_sequence_mean_then_mean():
    logp = torch.tensor([[[-1.0, -2.0], [-3.0, -4.0]],
                         [[-1.0, -1.0], [-5.0, -5.0]]], requires_grad=True)  # [N=2, NB=2, G=2]
    adv = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    valid = torch.tensor([[True, True], [True, False]])
    loss = rl_loss(logp, adv, valid)
    seq0 = (1 * 1 + 1 * 2 + 2 * 3 + 2 * 4) / 4  # -A·logp over 4 tokens
    seq1 = (0.5 * 1 + 0.5 * 1) / 2  # block 1 invalid
    assert loss.item() == pytest.approx((seq0 + seq1) / 2)
    loss.backward()
    assert logp.grad[1, 1].abs().sum() == 0  # invalid block gets no gradient
    # no valid token anywhere: a zero that still backpropagates
    z = rl_loss(logp, adv, torch.zeros_like(valid))
    assert z.item() == 0.0 and z.requires_grad


def test_ce_positions_and_loss():
    labels = torch.tensor([[5, 6, 7, 8, -100, -100],     # raw text, padded to 6
                           [-100, -100, 3, 4, 9, 1]])   # prompt of 2 tokens, completion 4
    lengths = torch.tensor([4, 6])
    rows, tgt, mask = ce_positions(labels, lengths)
    assert mask.tolist() == [[True, True, True, False, False], [False, True, True, True, True]]
    assert (rows[0] == torch.arange(5)).all()  # target t predicted from t - 1
    assert tgt[0, :3].tolist() == [6, 7, 8] and tgt[1, 1:].tolist() == [3, 4, 9, 1]
    logp = -torch.arange(10, dtype=torch.float32).view(2, 5)
    expect = ((0 + 1 + 2) / 3 + (6 + 7 + 8 + 9) / 4) / 2
    assert ce_loss(logp, mask).item() == pytest.approx(expect)
