"""Rewards: sign and scale, whitening and its fallbacks, CFM, metrics (engine-math §3, §3.1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ebft_engine import rewards as R
from ebft_engine.rewards import RewardOutput, compute_rewards, reward_metrics, whiten_group


def unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def rewards(gen, gt, a=1.0, d=1.0, white=False, **kw):
    return compute_rewards(gen, gt, alignment_coef=a, diversity_coef=d, use_whitening=white, **kw)


# --------------------------------------------------------------------------------------------
# Sign and scale on hand-made embeddings (no whitening)


def test_alignment_sign_and_the_x2_factor():
    gt = unit(2, 16)
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]])
    gen = signs.unsqueeze(-1) * gt.unsqueeze(1)  # φ_j = ±φ*
    out = rewards(gen, gt, a=1.0, d=0.0)
    torch.testing.assert_close(out.alignment, signs)
    torch.testing.assert_close(out.rewards, 2.0 * signs)  # x2 (paper eq. 7)
    # cosine, not dot product: scaling a sample changes nothing
    out2 = rewards(3.0 * gen, gt, a=1.0, d=0.0)
    torch.testing.assert_close(out2.alignment, signs)


def test_diversity_orthogonal_and_identical():
    eye = torch.eye(8)[:4]  # 4 orthonormal samples
    gt = unit(1, 8)
    out = rewards(eye[None], gt)
    torch.testing.assert_close(out.diversity, torch.zeros(1, 4))
    same = unit(1, 8).expand(4, 8)[None]  # 4 identical unit samples
    out = rewards(same, gt)
    torch.testing.assert_close(out.diversity, torch.ones(1, 4))
    # raw dot products (not cosines): halving the samples quarters v
    out = rewards(0.5 * same, gt)
    torch.testing.assert_close(out.diversity, torch.full((1, 4), 0.25))


def test_diversity_formula():
    gen = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    out = rewards(gen, torch.randn(3, 7))
    for g in range(3):
        for j in range(5):
            v = sum(float(gen[g, j] @ gen[g, k]) for k in range(5) if k != j) / 4
            assert out.diversity[g, j].item() == pytest.approx(v, rel=1e-5, abs=1e-6)


def test_rewards_linear_in_coefficients():
    gen, gt = unit(3, 4, 32, seed=2), unit(3, 32, seed=3)
    base = rewards(gen, gt, a=1.0, d=1.0)
    for a, d in [(0.0, 1.0), (1.0, 0.0), (0.5, 2.0), (3.0, 0.25)]:
        out = rewards(gen, gt, a=a, d=d)
        torch.testing.assert_close(out.rewards, 2 * a * base.alignment - 2 * d * base.diversity)
        torch.testing.assert_close(out.alignment, base.alignment)
        torch.testing.assert_close(out.diversity, base.diversity)
    # unwhitened, unit features, a = d = 1: r in [-4, 4]
    assert base.rewards.abs().max() <= 4.0 + 1e-6


def test_single_sample_has_no_diversity():
    gen, gt = unit(5, 1, 16), unit(5, 16, seed=1)
    for white in (False, True):
        out = rewards(gen, gt, white=white)
        assert out.rewards.shape == (5, 1)
        torch.testing.assert_close(out.diversity, torch.zeros(5, 1))
        torch.testing.assert_close(out.alignment[:, 0], (gen[:, 0] * gt).sum(-1))


def test_cfm_on_unwhitened_features():
    gen, gt = unit(6, 4, 32, seed=4), unit(6, 32, seed=5)
    expected = (gen.mean(1) - gt).pow(2).sum(-1)
    for white in (False, True):
        torch.testing.assert_close(rewards(gen, gt, white=white).cfm, expected)
    # a perfect, collapsed group: CFM 0
    assert rewards(gt[:, None].expand(6, 4, 32), gt).cfm.abs().max() < 1e-6


def test_groups_are_independent():
    gen, gt = unit(5, 4, 24, seed=6), unit(5, 24, seed=7)
    for white in (False, True):
        whole = rewards(gen, gt, a=1.0, d=0.5, white=white)
        for g in range(5):
            one = rewards(gen[g : g + 1], gt[g : g + 1], a=1.0, d=0.5, white=white)
            torch.testing.assert_close(whole.rewards[g], one.rewards[0], rtol=1e-5, atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="Gr, n, D"):
        rewards(torch.zeros(2, 3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        rewards(torch.zeros(2, 4), torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------
# Whitening (engine-math §3.1, §10.4)


def test_whitening_full_rank_is_orthonormal():
    gen = torch.randn(4, 512, generator=torch.Generator().manual_seed(8))
    gt = torch.randn(512, generator=torch.Generator().manual_seed(9))
    gen_w, gt_w = whiten_group(gen, gt)
    torch.testing.assert_close(gen_w @ gen_w.T, torch.eye(4), rtol=0, atol=1e-5)
    out = rewards(gen[None], gt[None], white=True)
    assert out.diversity.abs().max() < 1e-5
    assert out.n_whitening_fallback == 0 and out.n_eigh_fallback == 0
    # W·Φ = U·Vᵀ
    u, _, vh = torch.linalg.svd(gen, full_matrices=False)
    torch.testing.assert_close(gen_w, u @ vh, rtol=0, atol=1e-5)


def test_whitened_gt_is_row_sum_times_gt():
    """Row j of W·Φ* is (W𝟙)_j·φ*: the GT direction up to the sign of that row sum."""
    gen = torch.randn(4, 64, generator=torch.Generator().manual_seed(10))
    gt = F.normalize(torch.randn(64, generator=torch.Generator().manual_seed(11)), dim=0)
    gen_w, gt_w = whiten_group(gen, gt)
    u, s, _ = torch.linalg.svd(gen, full_matrices=False)
    w = u @ torch.diag(1 / s) @ u.T
    torch.testing.assert_close(gt_w, w.sum(1, keepdim=True) * gt, rtol=1e-4, atol=1e-6)
    out = rewards(gen[None], gt[None], white=True)
    expected_c = torch.sign(w.sum(1)) * F.cosine_similarity(gen_w, gt.expand(4, 64), dim=-1)
    torch.testing.assert_close(out.alignment[0], expected_c, rtol=1e-4, atol=1e-5)


def test_whitening_two_duplicates():
    base = torch.randn(3, 256, generator=torch.Generator().manual_seed(12))
    gen = torch.stack([base[0], base[0], base[1], base[2]])
    out = rewards(gen[None], unit(1, 256), white=True)
    torch.testing.assert_close(out.diversity[0], torch.tensor([0.5 / 3, 0.5 / 3, 0.0, 0.0]), rtol=0, atol=1e-5)
    assert out.diversity[0, 0].item() == pytest.approx(0.167, abs=1e-3)
    assert out.n_whitening_fallback == 0


def test_whitening_rank_deficient_groups():
    gt = unit(1, 128)
    # all four identical: projection onto 𝟙 -> every entry 1/4 -> v = 3·(1/4)/3
    same = unit(1, 128, seed=3).expand(4, 128)[None] * 2.0
    out = rewards(same, gt, white=True)
    torch.testing.assert_close(out.diversity, torch.full((1, 4), 0.25), rtol=0, atol=1e-5)
    # an all-zero group: nothing to keep, rewards 0, no NaN
    out = rewards(torch.zeros(1, 4, 128), gt, white=True)
    assert torch.isfinite(out.rewards).all() and out.rewards.abs().max() == 0
    # collinear samples (±, scaled): rank 1
    x = unit(128, seed=4)
    gen = torch.stack([x, -x, 2 * x, 0.5 * x])[None]
    out = rewards(gen, gt, white=True)
    assert torch.isfinite(out.rewards).all()
    gen_w, _ = whiten_group(gen[0], gt[0])
    p = gen_w @ gen_w.T
    torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-5)  # a projection of rank 1
    assert torch.trace(p).item() == pytest.approx(1.0, abs=1e-5)


def _raise(*args, **kwargs):
    raise torch.linalg.LinAlgError("forced failure")


def test_whitening_eigh_fallback_matches_svd(monkeypatch):
    full = torch.randn(4, 512, generator=torch.Generator().manual_seed(13))
    dup = torch.stack([full[0], full[0], full[1], full[2]])
    gen = torch.stack([full, dup, unit(4, 512, seed=5)])
    gt = unit(3, 512, seed=6)
    ref = rewards(gen, gt, d=0.7, white=True)
    monkeypatch.setattr(torch.linalg, "svd", _raise)
    out = rewards(gen, gt, d=0.7, white=True)
    assert out.n_eigh_fallback == 3 and out.n_whitening_fallback == 0
    for field in ("rewards", "alignment", "diversity", "cfm"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=0, atol=1e-5)
    gen_w, _ = whiten_group(full, gt[0])
    torch.testing.assert_close(gen_w @ gen_w.T, torch.eye(4), rtol=0, atol=1e-5)


def test_whitening_nonfinite_svd_result_uses_fallback(monkeypatch):
    """An SVD that returns garbage instead of raising is caught per group."""
    real_svd = torch.linalg.svd
    gen, gt = unit(3, 4, 64, seed=7), unit(3, 64, seed=8)
    ref = rewards(gen, gt, white=True)

    def nan_second_group(x, *args, **kwargs):
        u, s, vh = real_svd(x, *args, **kwargs)
        s = s.clone()
        s[1] = float("nan")
        return u, s, vh

    monkeypatch.setattr(torch.linalg, "svd", nan_second_group)
    out = rewards(gen, gt, white=True)
    assert out.n_eigh_fallback == 1 and out.n_whitening_fallback == 0
    torch.testing.assert_close(out.rewards, ref.rewards, rtol=0, atol=1e-5)


def test_whitening_total_failure_leaves_groups_unwhitened(monkeypatch):
    gen, gt = unit(3, 4, 64, seed=9), unit(3, 64, seed=10)
    plain = rewards(gen, gt, white=False)
    monkeypatch.setattr(torch.linalg, "svd", _raise)
    monkeypatch.setattr(torch.linalg, "eigh", _raise)
    out = rewards(gen, gt, white=True)
    assert out.n_whitening_fallback == 3
    torch.testing.assert_close(out.rewards, plain.rewards)


def test_whitening_partial_failure_counts_only_bad_groups(monkeypatch):
    gen, gt = unit(3, 4, 64, seed=11), unit(3, 64, seed=12)
    ref = rewards(gen, gt, white=True)
    plain = rewards(gen, gt, white=False)
    real_eigh = torch.linalg.eigh
    bad = gen[1].double()
    bad_gram = bad @ bad.T

    def eigh_fails_on_group_1(a, *args, **kwargs):
        if any(torch.allclose(m, bad_gram) for m in a):
            raise torch.linalg.LinAlgError("forced failure")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", _raise)
    monkeypatch.setattr(torch.linalg, "eigh", eigh_fails_on_group_1)
    out = rewards(gen, gt, white=True)
    assert out.n_whitening_fallback == 1 and out.n_eigh_fallback == 3
    torch.testing.assert_close(out.rewards[[0, 2]], ref.rewards[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.rewards[1], plain.rewards[1])


def test_whiten_group_float64_and_bf16_inputs():
    gen = torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    gen_w, gt_w = whiten_group(gen, torch.randn(32, dtype=torch.float64))
    assert gen_w.dtype == torch.float64
    torch.testing.assert_close(gen_w @ gen_w.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    out = rewards(gen.to(torch.bfloat16)[None], torch.randn(1, 32).to(torch.bfloat16), white=True)
    assert out.rewards.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Valid groups and metrics


def test_invalid_groups_are_zero_and_not_counted(monkeypatch):
    gen, gt = unit(3, 4, 32, seed=15), unit(3, 32, seed=16)
    gen[1] = float("nan")  # an invalid strided block may hold anything
    valid = torch.tensor([True, False, True])
    out = rewards(gen, gt, white=True, valid=valid)
    assert out.n_whitening_fallback == 0
    assert torch.isfinite(out.rewards).all() and (out.rewards[1] == 0).all() and out.cfm[1] == 0
    ok = rewards(gen[[0, 2]], gt[[0, 2]], white=True)
    torch.testing.assert_close(out.rewards[[0, 2]], ok.rewards)


def test_reward_metrics_over_valid_groups():
    out = RewardOutput(
        rewards=torch.tensor([[1.0, 3.0], [100.0, 100.0], [5.0, 7.0]]),
        alignment=torch.tensor([[0.5, 0.7], [9.0, 9.0], [0.1, 0.3]]),
        diversity=torch.tensor([[0.01, 0.03], [9.0, 9.0], [0.05, 0.07]]),
        cfm=torch.tensor([2.0, 99.0, 4.0]),
        n_whitening_fallback=0,
    )
    valid = torch.tensor([True, False, True])
    m = reward_metrics(out, valid)
    assert m == pytest.approx({"ebft/alignment": 0.4, "ebft/diversity": 0.04, "ebft/cfm_loss": 3.0,
                               "ebft/reward": 4.0})
    assert all(isinstance(v, float) for v in m.values())
    everything = reward_metrics(out)
    assert everything["ebft/cfm_loss"] == pytest.approx(35.0)
    none = reward_metrics(out, torch.zeros(3, dtype=torch.bool))
    assert set(none) == set(m) and all(math.isnan(v) for v in none.values())


def test_metric_scale_is_before_the_x2_and_coefficients():
    gt = unit(2, 16)
    gen = gt.unsqueeze(1).expand(2, 4, 16)  # collapsed on the GT: c = 1, v = 1
    m = reward_metrics(rewards(gen, gt, a=0.5, d=0.25))
    assert m["ebft/alignment"] == pytest.approx(1.0)
    assert m["ebft/diversity"] == pytest.approx(1.0)
    assert m["ebft/reward"] == pytest.approx(2 * 0.5 - 2 * 0.25)


def test_batched_svd_is_one_call(monkeypatch):
    """Groups are whitened together: one SVD call for the whole batch."""
    calls = []
    real_svd = torch.linalg.svd

    def counting(x, *a, **k):
        calls.append(tuple(x.shape))
        return real_svd(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    rewards(unit(50, 4, 96), unit(50, 96), white=True)
    assert calls == [(50, 4, 96)]
    assert R.SIGMA_CUTOFF == 1e-5
