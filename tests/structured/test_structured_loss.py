"""The GRPO / DAPO loss (ebft_engine/structured/loss.py) against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ebft_engine.structured.loss import LossSettings, completion_logprobs, entropy_sum, grpo_loss

LN2 = math.log(2.0)


def settings(loss_type: str = "grpo", eps_low: float = 0.2, eps_high: float = 0.2) -> LossSettings:
    return LossSettings(loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
                        importance_cap=3.0, max_completion_length=4)


def example():
    """Two completions, of 2 and 1 tokens (C = 3), advantages +1 and -2.

    Importance weights exp(logp - server): 2 and 5 -> capped to 3 for the first completion,
    0.25 -> raised to 1/3 for the second; the padded token (weight 0.01) is masked out.
    With ratio 1, each token's loss is -A·w: [-2, -3] and [+2/3]."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -3.0, -3.0]], requires_grad=True)
    server = logp.detach() - torch.tensor([[LN2, math.log(5.0), -math.log(100.0)],
                                           [-math.log(4.0), 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    return logp, server, mask, adv


@pytest.mark.parametrize("loss_type, value, grads", [
    # grpo: per-sequence token mean, then mean over the 2 sequences: ((-2-3)/2 + (2/3)/1) / 2
    ("grpo", (-2.5 + 2 / 3) / 2, [[-2 / 4, -3 / 4, 0.0], [(2 / 3) / 2, 0.0, 0.0]]),
    # bnpo: the step's token sum over its 3 completion tokens
    ("bnpo", (-2 - 3 + 2 / 3) / 3, [[-2 / 3, -3 / 3, 0.0], [(2 / 3) / 3, 0.0, 0.0]]),
    # dr_grpo: token sum over 2 sequences x max_completion_length 4
    ("dr_grpo", (-2 - 3 + 2 / 3) / 8, [[-2 / 8, -3 / 8, 0.0], [(2 / 3) / 8, 0.0, 0.0]]),
])
def test_loss_and_gradient_by_hand(loss_type, value, grads):
    logp, server, mask, adv = example()
    loss, stats = grpo_loss(logp, server, mask, adv, settings(loss_type), n_sequences=2, n_tokens=3)
    assert float(loss.detach()) == pytest.approx(value, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor(grads), atol=1e-6, rtol=0)
    # the raw weights over real tokens are 2, 5 and 0.25; the cap changed 5 and 0.25
    assert stats.min == pytest.approx(0.25) and stats.max == pytest.approx(5.0) and stats.n_clipped == 2


def test_dapo_clip_higher_with_an_older_sampling_policy():
    """ratio = exp(logp - old) = 1.5 on both tokens (weights 1). With A = +1 the clipped branch
    1 + eps_high wins (no gradient); with A = -1 the unclipped -1.5 is the min (gradient 1.5)."""
    logp = torch.tensor([[0.0], [0.0]], requires_grad=True)
    old = logp.detach() - math.log(1.5)
    mask = torch.ones(2, 1, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logp, old.clone(), mask, adv, settings("bnpo", eps_low=0.2, eps_high=0.28),
                            n_sequences=2, n_tokens=2, old_logp=old)
    assert float(loss.detach()) == pytest.approx((-1.28 + 1.5) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [1.5 / 2]]))
    assert (stats.min, stats.max, stats.n_clipped) == (1.0, 1.0, 0)
    # the same step with the symmetric clip of plain GRPO: 1 + 0.2 for the positive advantage
    loss, _ = grpo_loss(logp, old.clone(), mask, adv, settings("bnpo", eps_low=0.2, eps_high=0.2),
                        n_sequences=2, n_tokens=2, old_logp=old)
    assert float(loss.detach()) == pytest.approx((-1.2 + 1.5) / 2)


def test_micro_batch_losses_add_up_to_the_step_loss():
    """Normalisers are the whole step's: splitting the sequences into micro-batches changes nothing."""
    logp, server, mask, adv = example()
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        whole, _ = grpo_loss(logp, server, mask, adv, settings(loss_type), n_sequences=2, n_tokens=3)
        parts = [grpo_loss(logp[i:i + 1], server[i:i + 1], mask[i:i + 1], adv[i:i + 1], settings(loss_type),
                           n_sequences=2, n_tokens=3)[0] for i in range(2)]
        assert float(sum(parts).detach()) == pytest.approx(float(whole.detach()), abs=1e-6), loss_type


def test_completion_logprobs_and_entropy_by_hand():
    """Two vocabulary entries, logits rows chosen by position, temperature 2."""
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]])  # [B=1, L=3, V=2]
    positions = torch.tensor([[1, 2]])
    tokens = torch.tensor([[0, 0]])
    logp, logp_all = completion_logprobs(logits, positions, tokens, temperature=2.0)
    # row 1 / 2 = [1, 0]: p(0) = e/(e+1); row 2 / 2 = [0, 2]: p(0) = 1/(1+e^2)
    expected = [math.log(math.e / (math.e + 1)), math.log(1 / (1 + math.e ** 2))]
    torch.testing.assert_close(logp, torch.tensor([expected]))

    def h(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    total, count = entropy_sum(logp_all, torch.tensor([[True, False]]))
    assert count == 1 and total == pytest.approx(h(math.e / (math.e + 1)), abs=1e-6)
