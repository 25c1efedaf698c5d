"""Feature-matching rewards per group: alignment, diversity, whitening, CFM.

Reference: `shared/notes/engine-math.md` §3 and §3.1. A group is the n samples of one context
(strided: one document × block). With pooled features φ_1..φ_n and ground truth φ*:

    c_j = cos(φ_j, φ*_j)                    (φ*_j = φ* unless whitened)
    v_j = 1/(n−1) · Σ_{k≠j} ⟨φ_j, φ_k⟩       (raw dot product; 0 if n = 1)
    r_j = 2a·c_j − 2d·v_j
    CFM = ‖mean_j φ_j − φ*‖²                 (diagnostic; normalized, unwhitened features)

Whitening is the reference's sample-space variant: W = U·diag(σ⁻¹)·Uᵀ from the thin SVD of the
group's n×D features, applied to the samples and to φ* stacked n times. All groups are computed
at once (batched SVD); there is no Python loop over groups except in the last-resort fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SIGMA_CUTOFF = 1e-5
"""Singular values at or below SIGMA_CUTOFF·σ_max are treated as zero (reference)."""
SIGMA_EPS = 1e-12
"""Added to kept singular values before inverting (reference)."""
COS_EPS = 1e-8


@dataclass
class RewardOutput:
    """Rewards of Gr groups of n samples, with the parts the advantages and metrics need."""

    rewards: Tensor
    """[Gr, n] r_j = 2a·c_j − 2d·v_j (the reward actually used)."""
    alignment: Tensor
    """[Gr, n] c_j, cosine with the (whitened, if on) ground truth, before ×2 and coefficients."""
    diversity: Tensor
    """[Gr, n] v_j, mean dot product with the group's other samples, before ×2 and coefficients."""
    cfm: Tensor
    """[Gr] ‖mean_j φ_j − φ*‖² on the normalized, unwhitened features."""
    n_whitening_fallback: int = 0
    """Groups left unwhitened because both the SVD and the float64 eigh fallback failed."""
    n_eigh_fallback: int = 0
    """Groups whitened by the float64 eigh fallback because the float32 SVD failed."""


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _inverse_sigma(sigma: Tensor) -> Tensor:
    """[..., n] singular values -> 1/(σ + eps) where σ > cutoff·σ_max, else 0."""
    smax = sigma.amax(-1, keepdim=True)
    keep = sigma > SIGMA_CUTOFF * smax
    return torch.where(keep, 1.0 / (sigma + SIGMA_EPS), torch.zeros_like(sigma))


def _w_from(u: Tensor, inv: Tensor) -> Tensor:
    """U·diag(inv)·Uᵀ, batched."""
    return (u * inv.unsqueeze(-2)) @ u.transpose(-1, -2)


def _finite(sigma: Tensor, u: Tensor) -> Tensor:
    """[g] True where a decomposition is usable (a NaN σ would otherwise just be cut to 0)."""
    return torch.isfinite(sigma).all(-1) & torch.isfinite(u).flatten(1).all(-1)


def _eigh_whitening(gen: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic fallback: W from the eigendecomposition of ΦΦᵀ in float64, same cutoff on √λ.

    gen [g, n, D] -> (W [g, n, n] in gen's dtype, ok [g]). When the batched call fails, the groups
    are retried one by one so that one bad group does not spoil the others.
    """
    g64 = gen.double()
    try:
        lam, u = torch.linalg.eigh(g64 @ g64.transpose(-1, -2))
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        if gen.shape[0] == 1:
            n = gen.shape[1]
            return gen.new_empty(1, n, n), torch.zeros(1, dtype=torch.bool, device=gen.device)
        parts = [_eigh_whitening(gen[g : g + 1]) for g in range(gen.shape[0])]
        return torch.cat([w for w, _ in parts]), torch.cat([ok for _, ok in parts])
    w = _w_from(u, _inverse_sigma(lam.clamp_min(0.0).sqrt()))
    return w.to(gen.dtype), _finite(lam, u)


def _whitening_matrices(gen: Tensor) -> tuple[Tensor, Tensor, int]:
    """W per group. gen [Gr, n, D] -> (W [Gr, n, n] in gen's dtype, ok [Gr] bool, n_eigh).

    One batched SVD; the groups it fails on go to the eigh fallback; groups that fail both (ok
    False) get the identity, i.e. stay unwhitened.
    """
    Gr, n, _ = gen.shape
    try:
        u, s, _vh = torch.linalg.svd(gen, full_matrices=False)
        w, ok = _w_from(u, _inverse_sigma(s)), _finite(s, u)
    except RuntimeError:  # the whole batch fails together
        w = gen.new_empty(Gr, n, n)
        ok = torch.zeros(Gr, dtype=torch.bool, device=gen.device)
    redo = (~ok).nonzero().flatten()
    if redo.numel():
        w_e, ok_e = _eigh_whitening(gen[redo])
        w, ok = w.index_copy(0, redo, w_e), ok.index_copy(0, redo, ok_e)
    eye = torch.eye(n, dtype=gen.dtype, device=gen.device)
    return torch.where(ok.view(Gr, 1, 1), w, eye), ok, int(redo.numel())


def _whiten(gen: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """gen [Gr, n, D], gt [Gr, D] -> (W·Φ [Gr,n,D], W·Φ* [Gr,n,D], n_unwhitened, n_eigh)."""
    w, ok, n_eigh = _whitening_matrices(gen)
    gen_w = w @ gen
    gt_w = w.sum(-1, keepdim=True) * gt.unsqueeze(1)  # W·(φ* in n rows) = (W𝟙)_j · φ*
    return gen_w, gt_w, int((~ok).sum()), n_eigh


def whiten_group(gen: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Whiten one group (engine-math §3.1): gen [n, D], gt [D] -> (W·Φ [n, D], W·Φ* [n, D]).

    Computed in float32 (float64 input stays float64); a group that cannot be whitened is returned
    unwhitened (gt repeated n times).
    """
    dtype = _compute_dtype(gen)
    gen_w, gt_w, _, _ = _whiten(gen.to(dtype)[None], gt.to(dtype)[None])
    return gen_w[0].to(gen.dtype), gt_w[0].to(gen.dtype)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine along the last dim; 0 where either vector is (nearly) zero."""
    denom = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(COS_EPS)
    return (a * b).sum(-1) / denom


def pairwise_diversity(gen: Tensor) -> Tensor:
    """v_j = 1/(n−1)·Σ_{k≠j} ⟨φ_j, φ_k⟩. gen [..., n, D] -> [..., n]; zeros for n = 1."""
    n = gen.shape[-2]
    if n < 2:
        return gen.new_zeros(gen.shape[:-1])
    gram = gen @ gen.transpose(-1, -2)
    return (gram.sum(-1) - gram.diagonal(dim1=-2, dim2=-1)) / (n - 1)


def compute_rewards(
    gen: Tensor,
    gt: Tensor,
    *,
    alignment_coef: float,
    diversity_coef: float,
    use_whitening: bool,
    valid: Tensor | None = None,
) -> RewardOutput:
    """Rewards for Gr groups at once (engine-math §3).

    Args:
        gen: [Gr, n, D] pooled generated features, one row of n samples per group.
        gt: [Gr, D] pooled ground-truth feature of each group.
        alignment_coef, diversity_coef: a and d; the ×2 of paper eq. 7 is applied here.
        use_whitening: whiten each group in sample space first (§3.1); CFM never is.
        valid: optional [Gr] bool; invalid groups (e.g. strided blocks past a row's end) are not
            whitened or counted and get zeros everywhere, so their advantages are 0 too.

    Returns:
        RewardOutput with [Gr, n] rewards/alignment/diversity, [Gr] cfm (float32, or float64 for
        float64 input) and the whitening fallback counts.
    """
    if gen.dim() != 3 or gt.dim() != 2 or gen.shape[0] != gt.shape[0] or gen.shape[2] != gt.shape[1]:
        raise ValueError(f"compute_rewards wants gen [Gr, n, D] and gt [Gr, D]; got "
                         f"{tuple(gen.shape)} and {tuple(gt.shape)}")
    dtype = _compute_dtype(gen)
    gen = gen.to(dtype)
    gt = gt.to(dtype)
    Gr, n, _ = gen.shape
    if valid is not None:
        valid = valid.to(device=gen.device, dtype=torch.bool).view(Gr)
        gen = torch.where(valid.view(Gr, 1, 1), gen, torch.zeros_like(gen))
        gt = torch.where(valid.view(Gr, 1), gt, torch.zeros_like(gt))

    cfm = (gen.mean(dim=1) - gt).pow(2).sum(-1)

    n_unwhitened = n_eigh = 0
    if use_whitening and n >= 2 and Gr > 0:
        gen_r, gt_r, n_unwhitened, n_eigh = _whiten(gen, gt)
    else:  # with n = 1 whitening only rescales φ and φ* by the same 1/‖φ‖: cosines unchanged
        gen_r, gt_r = gen, gt.unsqueeze(1).expand_as(gen)

    alignment = _cosine(gen_r, gt_r)
    diversity = pairwise_diversity(gen_r)
    rewards = 2.0 * alignment_coef * alignment - 2.0 * diversity_coef * diversity
    return RewardOutput(
        rewards=rewards,
        alignment=alignment,
        diversity=diversity,
        cfm=cfm,
        n_whitening_fallback=n_unwhitened,
        n_eigh_fallback=n_eigh,
    )


def reward_metrics(out: RewardOutput, valid: Tensor | None = None) -> dict[str, float]:
    """Spec-named metrics over the valid groups (decisions.md §8).

    `ebft/alignment` = mean cosine (in [−1, 1]), `ebft/diversity` = mean pairwise similarity, both
    before the ×2 and the coefficients; `ebft/cfm_loss` = mean CFM; `ebft/reward` = mean reward
    actually used. No valid group -> every value NaN (the metrics writer logs it as null).
    """
    keys = ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward")
    Gr = out.rewards.shape[0]
    if valid is None:
        sel = slice(None)
        count = Gr
    else:
        sel = valid.to(device=out.rewards.device, dtype=torch.bool).view(Gr)
        count = int(sel.sum())
    if count == 0 or out.rewards.numel() == 0:
        return {k: math.nan for k in keys}
    values = (out.alignment[sel].mean(), out.diversity[sel].mean(), out.cfm[sel].mean(),
              out.rewards[sel].mean())
    return {k: float(v) for k, v in zip(keys, values)}
