"""The metrics we watch, from the spec's "Monitoring" table and troubleshooting rows.

One place for key, label, desired direction, healthy range, the range beyond which a value is bad,
display format and the hint to show. `desired` is None where the spec names a range but no
direction (grad_norm, entropy, is_ratio_min). With SVD whitening on, diversity is ~0 by
construction, so its range is not applied (decisions.md §7): see `healthy_range`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    short: str
    desired: Direction | None
    healthy: tuple[float, float] | None
    fmt: str
    hint: str
    # Outside (lo, hi) the value is "bad", not just "warn"; None on a side = no bound.
    bad: tuple[float | None, float | None] | None = None

    def format(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return format(value, self.fmt)


INF = float("inf")

METRICS: dict[str, MetricSpec] = {
    m.key: m
    for m in [
        MetricSpec(
            "ebft/alignment", "alignment", "align", "up", (0.3, 0.9), "+.3f",
            "Alignment stays below 0.1: the feature layers are not capturing useful information. "
            "Try different feature_layers or embed_method.",
            bad=(0.1, None),
        ),
        MetricSpec(
            "ebft/diversity", "diversity", "divers", "down", (0.01, 0.1), "+.3f",
            "Diversity above 1.0 means mode collapse (generations too similar). "
            "Increase diversity_coef or temperature.",
            bad=(None, 1.0),
        ),
        MetricSpec(
            "ebft/cfm_loss", "CFM loss", "cfm", "down", (0.0, 10.0), ".3f",
            "CFM loss should stay below 10 and fall; consistently above 100 means instability: "
            "lower learning_rate or check the data.",
            bad=(None, 100.0),
        ),
        MetricSpec(
            "ebft/reward", "reward", "reward", "up", None, "+.3f",
            "Reward stuck at -1.0: the diversity penalty dominates alignment. "
            "Reduce diversity_coef or increase alignment_coef.",
            bad=(-1.0 + 1e-6, None),
        ),
        MetricSpec(
            "grad_norm", "grad norm", "gn", None, (0.1, 3.0), ".2f",
            "Above 10 suggests instability (lower learning_rate or max_grad_norm). 0.0 is a "
            "zero-advantage skip (normal); consistently 0.0: increase num_generations or check the data.",
            bad=(None, 10.0),
        ),
        MetricSpec(
            "entropy", "entropy", "ent", None, (0.05, 0.5), ".3f",
            "Entropy below 0.01 suggests mode collapse: raise temperature or diversity_coef.",
            bad=(0.01, None),
        ),
        MetricSpec(
            "is_ratio_min", "IS ratio min", "isr", None, (0.1, INF), ".3f",
            "Near-zero means the policy is too far off-policy: increase vllm_sync_interval.",
            bad=(0.01, None),
        ),
    ]
}

# Order of the console line / cards.
CONSOLE_KEYS = ["ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "grad_norm"]
CARD_KEYS = list(METRICS)


def healthy_range(key: str, whitening: bool = False) -> tuple[float, float] | None:
    spec = METRICS.get(key)
    if spec is None:
        return None
    if whitening and key == "ebft/diversity":
        return None
    return spec.healthy


def bad_range(key: str, whitening: bool = False) -> tuple[float | None, float | None] | None:
    spec = METRICS.get(key)
    if spec is None:
        return None
    if whitening and key == "ebft/diversity":
        return None
    return spec.bad
