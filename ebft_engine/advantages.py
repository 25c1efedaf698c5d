"""Advantages from per-group rewards: rloo / group_norm / reinforce, and GRPO's reward scaling.

Reference: `shared/notes/engine-math.md` §4. The default `rloo` uses a component-wise baseline:
the alignment part is the leave-one-out mean of the others' cosines, the diversity part averages
each other sample's diversity *recomputed without sample j*, so no baseline term depends on ŷ_j
and the policy gradient is unbiased (without whitening). The naive leave-one-out mean of total
rewards (`naive_rloo`, axolotl's) keeps ⟨φ_i, φ_j⟩ terms in j's baseline and shrinks the expected
diversity gradient by (n−2)/(n−1).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ebft_engine.rewards import RewardOutput

ESTIMATORS = ("rloo", "group_norm", "reinforce")
"""Valid values of `ebft.advantage_estimator`."""
GROUP_NORM_EPS = 1e-8
SCALE_REWARDS_EPS = 1e-4

_warned_single_sample = False


def _warn_single_sample_once() -> None:
    global _warned_single_sample
    if not _warned_single_sample:
        _warned_single_sample = True
        warnings.warn(
            "one sample per context (n_samples_per_prompt / num_generations = 1): using the "
            "reinforce estimator (A = r) and no diversity penalty; a baseline needs n >= 2",
            RuntimeWarning,
            stacklevel=3,
        )


def rloo_baseline(out: RewardOutput, *, alignment_coef: float, diversity_coef: float) -> Tensor:
    """b_j = 2a·(Σ_k c_k − c_j)/(n−1) − 2d·β_j, β_j = (Σ_k v_k − 2·v_j)/(n−2) (0 for n = 2).

    [Gr, n]; needs n >= 2. β_j is the mean over i ≠ j of v_i recomputed without sample j.
    """
    n = out.rewards.shape[-1]
    if n < 2:
        raise ValueError("the rloo baseline needs at least 2 samples per group")
    c, v = out.alignment, out.diversity
    align_b = (c.sum(-1, keepdim=True) - c) / (n - 1)
    if n >= 3:
        beta = (v.sum(-1, keepdim=True) - 2.0 * v) / (n - 2)
    else:
        beta = torch.zeros_like(v)
    return 2.0 * alignment_coef * align_b - 2.0 * diversity_coef * beta


def compute_advantages(
    out: RewardOutput,
    *,
    estimator: str,
    alignment_coef: float,
    diversity_coef: float,
) -> Tensor:
    """Advantages [Gr, n] from `compute_rewards` output (same a, d as the rewards).

    `rloo`: A = r − b (component-wise unbiased baseline, `rloo_baseline`); `group_norm`:
    (r − mean)/(unbiased std + 1e-8) over the group; `reinforce`: A = r. A group of one sample
    always uses `reinforce` (warned once).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"ebft.advantage_estimator: unknown estimator {estimator!r}; choose one "
                         f"of {', '.join(ESTIMATORS)}")
    r = out.rewards
    n = r.shape[-1]
    if n == 1 and estimator != "reinforce":
        _warn_single_sample_once()
        estimator = "reinforce"
    if estimator == "reinforce":
        return r.clone()
    if estimator == "rloo":
        return r - rloo_baseline(out, alignment_coef=alignment_coef, diversity_coef=diversity_coef)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True, correction=1)
    return (r - mean) / (std + GROUP_NORM_EPS)


def naive_rloo(rewards: Tensor) -> Tensor:
    """A_j = r_j − mean_{k≠j} r_k over the last dim ([..., n], n >= 2). Biased for diversity;
    kept for the Monte-Carlo test and the docs (axolotl's estimator)."""
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per group")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)


def _std(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Unbiased std (as TRL), 0 where there is a single value instead of NaN."""
    count = x.numel() if dim is None else x.shape[dim]
    if count < 2:
        return torch.zeros_like(x.mean(dim, keepdim=keepdim) if dim is not None else x.mean())
    return x.std(dim, keepdim=keepdim) if dim is not None else x.std()


def scale_group_rewards(rewards: Tensor, mode: str | bool) -> Tensor:
    """GRPO advantages for structured mode (`trl.scale_rewards`), rewards [Gr, n] -> [Gr, n].

    "group"/True: (r − mean_g)/(std_g + 1e-4); "batch": (r − mean_g)/(std over the whole batch +
    1e-4); "none"/False: r − mean_g. Unbiased stds, as TRL. The mean includes j, so the diversity
    part is shrunk by (n−2)/(n−1) relative to alignment (engine-math §4).
    """
    if mode is True or mode == "group":
        key = "group"
    elif mode is False or mode == "none":
        key = "none"
    elif mode == "batch":
        key = "batch"
    else:
        raise ValueError(f"trl.scale_rewards: unknown value {mode!r}; use group (or true), "
                         "batch, or none (or false)")
    centered = rewards - rewards.mean(-1, keepdim=True)
    if key == "none":
        return centered
    std = _std(rewards, dim=-1, keepdim=True) if key == "group" else _std(rewards)
    return centered / (std + SCALE_REWARDS_EPS)
