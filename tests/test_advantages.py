"""Advantages: the unbiased component-wise RLOO baseline, group_norm, reinforce, GRPO scaling
(engine-math §4, §10.5)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from ebft_engine import advantages as adv
from ebft_engine.advantages import compute_advantages, naive_rloo, rloo_baseline, scale_group_rewards
from ebft_engine.rewards import RewardOutput, compute_rewards

# --------------------------------------------------------------------------------------------
# The toy policy of §10.5: softmax over K outcomes, each with a fixed unit feature vector

K, D = 5, 4
A_COEF, D_COEF = 1.0, 1.0


def _toy():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(K, generator=g, dtype=torch.float64)
    phi = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1)
    phi_star = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=-1)
    return theta, phi, phi_star


def _exact_gradients(theta, phi, phi_star, a=A_COEF, d=D_COEF):
    """∇θ of 2a·E cos(φ(ŷ), φ*) and of −d·‖Eφ(ŷ)‖², separately, by autograd."""
    t = theta.clone().requires_grad_(True)
    p = torch.softmax(t, 0)
    align = 2 * a * (p * (phi @ phi_star)).sum()
    (g_align,) = torch.autograd.grad(align, t)
    t = theta.clone().requires_grad_(True)
    p = torch.softmax(t, 0)
    div = -d * (p @ phi).pow(2).sum()
    (g_div,) = torch.autograd.grad(div, t)
    return g_align, g_div


def _per_group_gradient(y, theta, phi, phi_star, estimator, a=A_COEF, d=D_COEF):
    """(1/n)·Σ_j A_j·∇θ log p(ŷ_j) for each group of outcomes y [N, n] -> [N, K]."""
    N, n = y.shape
    out = compute_rewards(phi[y], phi_star.expand(N, D), alignment_coef=a, diversity_coef=d,
                          use_whitening=False)
    if estimator == "naive":
        A = naive_rloo(out.rewards)
    else:
        A = compute_advantages(out, estimator=estimator, alignment_coef=a, diversity_coef=d)
    score = F.one_hot(y, K).to(torch.float64) - torch.softmax(theta, 0)  # ∇θ log softmax
    return (A.unsqueeze(-1) * score).mean(1)


def _enumerated_expectation(n, theta, phi, phi_star, estimator, **coefs):
    """E over all K^n outcome tuples, weighted by their probabilities: exact, no sampling."""
    y = torch.cartesian_prod(*[torch.arange(K)] * n).view(-1, n)
    logp = torch.log_softmax(theta, 0)[y].sum(-1)
    per_group = _per_group_gradient(y, theta, phi, phi_star, estimator, **coefs)
    return (logp.exp().unsqueeze(-1) * per_group).sum(0)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_rloo_is_unbiased_exactly(n):
    """Enumerating every tuple: E[(1/n)Σ A_j ∇log p(ŷ_j)] = ∇[2a·E cos − d‖Eφ‖²] to float64."""
    theta, phi, phi_star = _toy()
    g_align, g_div = _exact_gradients(theta, phi, phi_star)
    got = _enumerated_expectation(n, theta, phi, phi_star, "rloo")
    torch.testing.assert_close(got, g_align + g_div, rtol=1e-9, atol=1e-11)
    # separately, for other coefficients
    got = _enumerated_expectation(n, theta, phi, phi_star, "rloo", a=0.3, d=2.0)
    ga, gd = _exact_gradients(theta, phi, phi_star, a=0.3, d=2.0)
    torch.testing.assert_close(got, ga + gd, rtol=1e-9, atol=1e-11)
    # reinforce (no baseline) is unbiased too, just noisier
    torch.testing.assert_close(_enumerated_expectation(n, theta, phi, phi_star, "reinforce"),
                               g_align + g_div, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_naive_baseline_shrinks_diversity_exactly(n):
    """The naive leave-one-out mean of total rewards: diversity part × (n−2)/(n−1)."""
    theta, phi, phi_star = _toy()
    g_align, g_div = _exact_gradients(theta, phi, phi_star)
    got = _enumerated_expectation(n, theta, phi, phi_star, "naive")
    torch.testing.assert_close(got, g_align + (n - 2) / (n - 1) * g_div, rtol=1e-9, atol=1e-11)
    assert (got - (g_align + g_div)).abs().max() > 1e-2  # the bias is real


@pytest.mark.parametrize("n", [2, 3, 4])
def test_rloo_unbiased_monte_carlo(n):
    """§10.5 as written: 10⁵ sampled groups, within Monte-Carlo error of the exact gradient; the
    naive baseline lands on (n−2)/(n−1) of the diversity part instead."""
    theta, phi, phi_star = _toy()
    g_align, g_div = _exact_gradients(theta, phi, phi_star)
    N = 100_000
    gen = torch.Generator().manual_seed(100 + n)
    y = torch.multinomial(torch.softmax(theta, 0), N * n, replacement=True, generator=gen).view(N, n)

    per_group = _per_group_gradient(y, theta, phi, phi_star, "rloo")
    mean, se = per_group.mean(0), per_group.std(0) / math.sqrt(N)
    assert ((mean - (g_align + g_div)).abs() <= 5 * se + 1e-12).all(), (mean, g_align + g_div, se)

    naive = _per_group_gradient(y, theta, phi, phi_star, "naive")
    mean_n, se_n = naive.mean(0), naive.std(0) / math.sqrt(N)
    expected_naive = g_align + (n - 2) / (n - 1) * g_div
    assert ((mean_n - expected_naive).abs() <= 5 * se_n + 1e-12).all(), (mean_n, expected_naive, se_n)
    # the test can tell them apart: the naive estimate misses the exact gradient by many SEs
    assert ((mean_n - (g_align + g_div)).abs() / se_n).max() > 10


# --------------------------------------------------------------------------------------------
# The baseline's definition


@pytest.mark.parametrize("n", [3, 4, 6])
def test_rloo_baseline_is_the_others_mean_reward_recomputed_without_j(n):
    g = torch.Generator().manual_seed(n)
    gen = F.normalize(torch.randn(2, n, 8, generator=g, dtype=torch.float64), dim=-1)
    gt = F.normalize(torch.randn(2, 8, generator=g, dtype=torch.float64), dim=-1)
    a, d = 0.7, 1.3
    out = compute_rewards(gen, gt, alignment_coef=a, diversity_coef=d, use_whitening=False)
    b = rloo_baseline(out, alignment_coef=a, diversity_coef=d)
    for j in range(n):
        keep = [i for i in range(n) if i != j]
        without_j = compute_rewards(gen[:, keep], gt, alignment_coef=a, diversity_coef=d,
                                    use_whitening=False)
        torch.testing.assert_close(b[:, j], without_j.rewards.mean(-1), rtol=1e-10, atol=1e-12)
    A = compute_advantages(out, estimator="rloo", alignment_coef=a, diversity_coef=d)
    torch.testing.assert_close(A, out.rewards - b)


def test_rloo_two_samples():
    g = torch.Generator().manual_seed(7)
    gen = F.normalize(torch.randn(3, 2, 8, generator=g), dim=-1)
    gt = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    out = compute_rewards(gen, gt, alignment_coef=1.0, diversity_coef=0.5, use_whitening=False)
    A = compute_advantages(out, estimator="rloo", alignment_coef=1.0, diversity_coef=0.5)
    c, v = out.alignment, out.diversity
    torch.testing.assert_close(A[:, 0], 2 * (c[:, 0] - c[:, 1]) - 2 * 0.5 * v[:, 0])
    torch.testing.assert_close(A[:, 1], 2 * (c[:, 1] - c[:, 0]) - 2 * 0.5 * v[:, 1])
    # naive at n = 2: the diversity term cancels entirely
    torch.testing.assert_close(naive_rloo(out.rewards)[:, 0], 2 * (c[:, 0] - c[:, 1]))


def test_naive_rloo_values():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    torch.testing.assert_close(naive_rloo(r), torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 2.0]]))
    with pytest.raises(ValueError):
        naive_rloo(torch.ones(2, 1))


# --------------------------------------------------------------------------------------------
# group_norm, reinforce, n = 1, errors


def _out(rewards: torch.Tensor) -> RewardOutput:
    Gr, n = rewards.shape
    return RewardOutput(rewards=rewards, alignment=rewards / 2, diversity=torch.zeros(Gr, n),
                        cfm=torch.zeros(Gr), n_whitening_fallback=0)


def test_group_norm_and_reinforce():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    A = compute_advantages(_out(r), estimator="group_norm", alignment_coef=1.0, diversity_coef=1.0)
    std = r[0].std()  # unbiased
    torch.testing.assert_close(A[0], (r[0] - 3.0) / (std + 1e-8))
    torch.testing.assert_close(A[1], torch.zeros(4))  # constant group: 0, not NaN
    R = compute_advantages(_out(r), estimator="reinforce", alignment_coef=1.0, diversity_coef=1.0)
    torch.testing.assert_close(R, r)
    assert R.data_ptr() != r.data_ptr()


def test_single_sample_forces_reinforce_and_warns_once(monkeypatch):
    monkeypatch.setattr(adv, "_warned_single_sample", False)
    r = torch.tensor([[0.4], [-0.2]])
    with pytest.warns(RuntimeWarning, match="reinforce"):
        A = compute_advantages(_out(r), estimator="rloo", alignment_coef=1.0, diversity_coef=1.0)
    torch.testing.assert_close(A, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A = compute_advantages(_out(r), estimator="group_norm", alignment_coef=1.0, diversity_coef=1.0)
    torch.testing.assert_close(A, r)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="ebft.advantage_estimator.*rloo, group_norm, reinforce"):
        compute_advantages(_out(torch.ones(1, 4)), estimator="ppo", alignment_coef=1.0, diversity_coef=1.0)


def test_invalid_groups_get_zero_advantages():
    g = torch.Generator().manual_seed(8)
    gen = F.normalize(torch.randn(3, 4, 16, generator=g), dim=-1)
    gt = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    valid = torch.tensor([True, False, True])
    out = compute_rewards(gen, gt, alignment_coef=1.0, diversity_coef=1.0, use_whitening=True, valid=valid)
    for est in adv.ESTIMATORS:
        A = compute_advantages(out, estimator=est, alignment_coef=1.0, diversity_coef=1.0)
        assert (A[1] == 0).all() and torch.isfinite(A).all()


# --------------------------------------------------------------------------------------------
# GRPO reward scaling (structured mode)


def test_scale_group_rewards():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    centered = r - r.mean(-1, keepdim=True)
    group = centered / (r.std(-1, keepdim=True) + 1e-4)
    torch.testing.assert_close(scale_group_rewards(r, "group"), group)
    torch.testing.assert_close(scale_group_rewards(r, True), group)
    torch.testing.assert_close(scale_group_rewards(r, "batch"), centered / (r.std() + 1e-4))
    torch.testing.assert_close(scale_group_rewards(r, "none"), centered)
    torch.testing.assert_close(scale_group_rewards(r, False), centered)
    # constant groups and single samples give 0, not NaN
    torch.testing.assert_close(scale_group_rewards(torch.full((2, 3), 2.0), "group"), torch.zeros(2, 3))
    torch.testing.assert_close(scale_group_rewards(torch.tensor([[1.0], [3.0]]), "group"), torch.zeros(2, 1))
    torch.testing.assert_close(scale_group_rewards(torch.tensor([[1.0]]), "batch"), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="trl.scale_rewards"):
        scale_group_rewards(r, "sometimes")
