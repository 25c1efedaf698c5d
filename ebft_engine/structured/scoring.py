"""Scoring: the frozen feature network reads each group's sequences; rewards come from the pooled
features (alignment with the GT, diversity between samples, CFM; `rewards.py`).

The feature network is the base model: the trained model with its adapter disabled, or a frozen
copy for a full fine-tune (never the weights being trained).
"""

from __future__ import annotations

from typing import Any

import torch

from ebft_engine.config import EbftConfig
from ebft_engine.rewards import RewardOutput, compute_rewards
from ebft_engine.structured.groups import FeatSeq, Group, pad


class FeatureScorer:
    """Pooled features of feature sequences, and the rewards of whole groups."""

    def __init__(self, cfg: EbftConfig, model: Any, *, pad_id: int, device: torch.device):
        from ebft_engine.features import (feature_layer_indices, is_peft_model, make_frozen_copy,
                                          num_decoder_layers)

        e = cfg.ebft
        self.feature_model = model if is_peft_model(model) else make_frozen_copy(model)
        self.layers = feature_layer_indices(list(e.feature_layers), num_decoder_layers(model))
        self.embed_method = e.embed_method
        self.alignment_coef, self.diversity_coef = e.alignment_coef, e.diversity_coef
        self.use_whitening = e.use_whitening
        self.n = int(cfg.trl.num_generations)
        self.chunk = max(1, cfg.micro_batch_size)
        self.pad_id, self.device = pad_id, device

    @torch.no_grad()
    def score(self, groups: list[Group]) -> RewardOutput:
        """Rewards of `groups` ([G, n] tensors), each group against its own GT."""
        gen = self.pooled([f for g in groups for f in g.gen_feats])
        gt = self.pooled([g.gt_feat for g in groups])
        return compute_rewards(gen.view(len(groups), self.n, -1), gt,
                               alignment_coef=self.alignment_coef, diversity_coef=self.diversity_coef,
                               use_whitening=self.use_whitening)

    def pooled(self, seqs: list[FeatSeq]) -> torch.Tensor:
        """[len(seqs), D] float32: token features of the chosen layers, pooled per sequence."""
        from ebft_engine.features import frozen_feature_model, pool, token_features

        out = []
        with frozen_feature_model(self.feature_model) as fm:
            for i in range(0, len(seqs), self.chunk):
                part = seqs[i:i + self.chunk]
                ids, real, comp = pad([s.ids for s in part], [s.completion for s in part],
                                      self.pad_id, self.device)
                feats = token_features(fm, ids, attention_mask=real.long(), layer_indices=self.layers)
                out.append(pool(feats, real, self.embed_method, comp).float())
        return torch.cat(out, dim=0)


def cat_rewards(parts: list[RewardOutput]) -> RewardOutput:
    """Concatenate RewardOutputs of disjoint groups along the group axis."""
    if len(parts) == 1:
        return parts[0]
    return RewardOutput(rewards=torch.cat([p.rewards for p in parts]),
                        alignment=torch.cat([p.alignment for p in parts]),
                        diversity=torch.cat([p.diversity for p in parts]),
                        cfm=torch.cat([p.cfm for p in parts]),
                        n_whitening_fallback=sum(p.n_whitening_fallback for p in parts),
                        n_eigh_fallback=sum(p.n_eigh_fallback for p in parts))
