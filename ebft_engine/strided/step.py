"""Strided mode's Stepper: one optimizer step of rollouts inside documents, rewards and backward.

Per micro-batch (engine-math §5-6):

    collate (right padding) -> layout (per-row anchors) -> KV-cached block-parallel sampling of
    n samples per document (eval mode) -> frozen feature pass over document + generated region
    with the block mask (GT features at a_b..a_b+G−1, generated ones at the block slots) -> pool
    per block -> rewards per group (one document × block, n samples) -> advantages -> training
    forward with the block mask -> log-probs at the index map with the sampling temperature ->
    rl_coef·rl_loss + ce_coef·ce_loss, divided over the micro-batches -> backward.

The n samples of a document are laid out as n·NB blocks of one row (`StridedLayout.fold`), not as
n copies of the document: blocks never see each other, so every number is the same (tested against
each block run alone), while the two big forwards process B·(S + n·NB·G) tokens instead of
B·n·(S + NB·G). Results go back to [B·n, NB, ...] (`unfold_samples`) for rewards and losses.

The mask is dense SDPA where flex cannot train (CPU) and a flex BlockMask when the model was
loaded with `attn_implementation="flex_attention"` on CUDA (`modeling.resolve_attn_implementation`
decides that from `flex_attention: true`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ebft_engine.advantages import compute_advantages
from ebft_engine.config import EbftConfig
from ebft_engine.features import (feature_layer_indices, frozen_feature_model, is_peft_model,
                                  make_frozen_copy, num_decoder_layers, pool_blocks, token_features)
from ebft_engine.rewards import compute_rewards, reward_metrics
from ebft_engine.stepper import NothingToTrainError, StepResult, report_phase

from .generate import generate_blocks
from .layout import (StridedLayout, block_view, fold_sample_rows, gen_region, make_layout, row_anchors,
                     unfold_samples)
from .loss import ce_loss, ce_positions, gather_logprobs, rl_loss
from .mask import (attention_for, attn_implementation, dense_block_mask, flex_block_mask,
                   forward_with_mask, lm_head, supports_flex)

LM_HEAD_CHUNK = 512
"""Rows per lm_head call in the loss (engine-math §5: 256-1024)."""

RATE_METRICS = ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "entropy",
                "loss", "rl_loss", "ce_loss")
COUNT_METRICS = ("n_invalid_blocks", "n_blocks", "n_empty_micro_batches", "n_whitening_fallback")


def to_groups(per_sample: Tensor, n: int) -> Tensor:
    """[B·n, NB, ...] (row r·n + j = sample j of document r) -> [B·NB, n, ...]: one group per
    (document, block), its n samples in order."""
    N, NB = per_sample.shape[:2]
    rest = per_sample.shape[2:]
    return per_sample.view(N // n, n, NB, *rest).transpose(1, 2).reshape(N // n * NB, n, *rest)


def from_groups(per_group: Tensor, B: int) -> Tensor:
    """Inverse of `to_groups`: [B·NB, n, ...] -> [B·n, NB, ...]."""
    n_groups, n = per_group.shape[:2]
    NB = n_groups // B
    rest = per_group.shape[2:]
    return per_group.view(B, NB, n, *rest).transpose(1, 2).reshape(B * n, NB, *rest)


def _row_lengths(data: Any, max_len: int | None) -> tuple[Tensor, Tensor]:
    """(real tokens per row, cut to max_len; prompt length per row, -1 for raw text), read as
    columns when `data` is a datasets.Dataset (fast), row by row otherwise."""
    if hasattr(data, "column_names"):
        ids = data["input_ids"]
        prompts = data["prompt_length"] if "prompt_length" in data.column_names else [None] * len(ids)
    else:
        ids = [row["input_ids"] for row in data]
        prompts = [row.get("prompt_length") for row in data]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    if max_len:
        lengths = lengths.clamp(max=int(max_len))
    return lengths, torch.tensor([-1 if p is None else int(p) for p in prompts], dtype=torch.long)


def _as_list(x: Any) -> list[int]:
    if isinstance(x, Tensor):
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


class StridedStepper:
    """The strided mode (`ebft_engine/stepper.py` protocol). One row = one document."""

    def __init__(self, cfg: EbftConfig, model: nn.Module, tokenizer: Any, device: Any, dtype: Any = None,
                 feature_model: nn.Module | None = None, fold_samples: bool = True):
        e = cfg.ebft
        self.cfg, self.e = cfg, e
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.rows_per_step = int(cfg.micro_batch_size) * int(cfg.gradient_accumulation_steps)
        self.n = int(e.n_samples_per_prompt)
        self.window = e.context_length if e.sliding_context_window else None
        self.layer_indices = feature_layer_indices(e.feature_layers, num_decoder_layers(model))
        self.max_len = cfg.sequence_len
        self.seed = cfg.seed
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None and tokenizer is not None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        # The frozen feature network: LoRA -> the same model with adapters off; full fine-tune ->
        # a frozen copy made once here (never the weights being trained).
        if feature_model is None and not is_peft_model(model):
            feature_model = make_frozen_copy(model)
        self.feature_model = feature_model
        # flex only where the model runs it and it can train (CUDA); dense SDPA masks elsewhere
        self.use_flex = (attn_implementation(model) == "flex_attention"
                         and supports_flex(self.device, requires_grad=True))
        self.estimator = e.advantage_estimator
        self.diversity_coef = float(e.diversity_coef)
        if self.n == 1:  # config validation already does this; keep the math safe regardless
            self.estimator, self.diversity_coef = "reinforce", 0.0
        self._warned_empty = False
        self.fold_samples = fold_samples
        """n·NB blocks per document row (True) or n copies of each document (False: the same
        numbers, more compute; kept for bench/strided_step.py's side-by-side)."""

    # ------------------------------------------------------------------------------------------
    # Stepper protocol

    def run_step(self, rows: Sequence[dict[str, Any]], step: int) -> StepResult:
        mbs = int(self.cfg.micro_batch_size)
        micro = [list(rows[i: i + mbs]) for i in range(0, len(rows), mbs)]
        sums: dict[str, float] = {}
        weights: dict[str, int] = {}
        counts = {k: 0 for k in COUNT_METRICS}
        n_tokens = 0
        any_backward = False
        for i, batch in enumerate(micro):
            gen = torch.Generator(device=self.device)
            gen.manual_seed((self.seed * 1_000_003 + int(step) * 1_009 + i) % (2**63 - 1))
            m, tokens, did_backward = self._micro_step(batch, len(micro), gen)
            n_tokens += tokens
            any_backward |= did_backward
            for k in COUNT_METRICS:
                counts[k] += int(m.pop(k, 0))
            for k, v in m.items():
                if v is not None and math.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + v
                    weights[k] = weights.get(k, 0) + 1
        metrics = {k: sums[k] / weights[k] for k in sums}
        for k in RATE_METRICS:
            metrics.setdefault(k, math.nan)
        if not any_backward:
            metrics["loss"] = metrics["rl_loss"] = 0.0
        metrics.update({k: float(v) for k, v in counts.items()})
        return StepResult(metrics=metrics, n_tokens=n_tokens, skipped=not any_backward)

    def check_rows(self, data: Any) -> str | None:
        """Rows with room for at least one block (anchor + generate_max_len real tokens within
        sequence_len): NothingToTrainError when there is none, a warning when some lack it."""
        e = self.e
        lengths, prompts = _row_lengths(data, self.max_len)
        anchors = row_anchors(prompts, len(lengths), context_length=int(e.context_length),
                              min_completion_prefix=int(e.min_completion_prefix))
        fits = lengths - int(e.generate_max_len) - anchors >= 0
        need = (f"a block needs its anchor (ebft.context_length = {e.context_length} tokens, or the "
                f"prompt + ebft.min_completion_prefix = {e.min_completion_prefix}) plus "
                f"ebft.generate_max_len = {e.generate_max_len} real tokens, within sequence_len = "
                f"{self.max_len}")
        n, ok = len(lengths), int(fits.sum())
        if ok == 0:
            longest = int(lengths.max()) if n else 0
            raise NothingToTrainError(
                f"none of the {n} training rows has room for one strided block, so no step could "
                f"train anything: {need}; the longest row has {longest}. Lower ebft.context_length, "
                "ebft.generate_max_len or ebft.min_completion_prefix, or use longer documents.")
        if ok < n:
            return f"{n - ok} of the {n} training rows have no room for a strided block and train nothing ({need})"
        return None

    def after_optimizer_step(self, step: int) -> None:
        return None

    def close(self) -> None:
        return None

    # ------------------------------------------------------------------------------------------
    # One micro-batch

    def collate(self, rows: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Right-pad rows to the longest: (input_ids [B, S], labels [B, S] with −100 on pads,
        real lengths [B], prompt lengths [B], −1 where a row has none)."""
        ids = [_as_list(r["input_ids"]) for r in rows]
        if self.max_len:
            ids = [x[: self.max_len] for x in ids]
        S = max((len(x) for x in ids), default=0)
        B = len(rows)
        input_ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        labels = torch.full((B, S), -100, dtype=torch.long)
        lengths = torch.zeros(B, dtype=torch.long)
        prompts = torch.full((B,), -1, dtype=torch.long)
        for r, (row, x) in enumerate(zip(rows, ids)):
            ell = len(x)
            lengths[r] = ell
            if ell:
                input_ids[r, :ell] = torch.tensor(x)
            lab = row.get("labels")
            lab = x if lab is None else _as_list(lab)[:ell]
            if lab:
                labels[r, : len(lab)] = torch.tensor(lab)
            p = row.get("prompt_length")
            if p is not None:
                prompts[r] = int(p)
        dev = self.device
        return input_ids.to(dev), labels.to(dev), lengths.to(dev), prompts.to(dev)

    def make_layout(self, lengths: Tensor, prompts: Tensor, S: int) -> StridedLayout:
        e = self.e
        return make_layout(lengths, prompts, S, stride=int(e.stride), context_length=int(e.context_length),
                           generate_max_len=int(e.generate_max_len),
                           min_completion_prefix=int(e.min_completion_prefix), sliding_window=self.window)

    def _mask(self, layout: StridedLayout, copies: int = 1):
        if self.use_flex:
            return flex_block_mask(layout, repeat=copies)
        return dense_block_mask(layout, repeat=copies)

    def _features(self, seq: Tensor, mask, layout: StridedLayout, rollout: StridedLayout,
                  copies: int = 1) -> tuple[Tensor, Tensor]:
        """Pooled (generated [B·n, NB, D'], ground truth [B, NB, D']) from one frozen forward over
        `seq` [B·copies, rollout.T] (each document row `copies` times over)."""
        B = layout.B
        fm = self.feature_model if self.feature_model is not None else self.model
        positions = rollout.repeat(copies).position_ids
        with frozen_feature_model(fm) as frozen, attention_for(frozen, mask):
            feats = token_features(frozen, seq, attention_mask=mask, position_ids=positions,
                                   layer_indices=self.layer_indices)  # [B·copies, T', D]
        method = self.e.embed_method
        gen = unfold_samples(pool_blocks(block_view(feats, rollout), method), self.n // copies)
        doc = feats[::copies, : layout.S]  # the copies of a document are equal
        D = doc.shape[-1]
        idx = layout.gt_positions.reshape(B, -1)
        gt = doc.gather(1, idx.unsqueeze(-1).expand(B, idx.shape[1], D)).view(B, layout.NB, layout.G, D)
        return gen, pool_blocks(gt, method)

    def _micro_step(self, rows: Sequence[dict[str, Any]], n_micro: int,
                    generator: torch.Generator) -> tuple[dict[str, float], int, bool]:
        e, n, model = self.e, self.n, self.model
        input_ids, labels, lengths, prompts = self.collate(rows)
        B, S = input_ids.shape
        layout = self.make_layout(lengths, prompts, S)
        counts = {"n_blocks": layout.n_valid_blocks,
                  "n_invalid_blocks": layout.B * layout.NB - layout.n_valid_blocks}
        if layout.n_valid_blocks == 0:
            if not self._warned_empty:
                self._warned_empty = True
                warnings.warn(
                    f"strided: a micro-batch has no room for a block (rows of {lengths.tolist()} tokens; "
                    f"a block needs anchor + generate_max_len = {int(layout.row_anchor.min())} + "
                    f"{layout.G} real tokens): zero loss for it. Lower context_length / "
                    "min_completion_prefix / generate_max_len or use longer rows.", RuntimeWarning,
                    stacklevel=3)
            return {**counts, "n_empty_micro_batches": 1}, 0, False

        # 1. rollouts: n samples per document, every block at once (eval mode, no grad). Sampling
        #    runs on n copies (one prefill, the cache repeated: slightly faster than the folded row,
        #    whose decode steps see n times the keys); the forwards then take the n samples as
        #    n·NB blocks of each document's row (or, unfolded, n copies of the row)
        report_phase(self, "generating")
        tokens = generate_blocks(model, input_ids, layout, n_samples=n, temperature=float(e.temperature),
                                 top_p=float(e.top_p), generator=generator)  # [B·n, NB, G]
        rollout, copies = (layout.fold(n), 1) if self.fold_samples else (layout, n)
        run = rollout.repeat(copies)  # the rows the forwards see: [B·copies, S + (n/copies)·NB·G]
        tokens_x = fold_sample_rows(tokens, n // copies)  # [B·copies, (n/copies)·NB, G]
        valid = layout.valid.repeat_interleave(n, dim=0)  # [B·n, NB]
        seq = torch.cat([input_ids.repeat_interleave(copies, dim=0), gen_region(tokens_x, rollout)], dim=1)
        mask = self._mask(rollout, copies)

        # 2. rewards from the frozen features; one group per (document, block)
        report_phase(self, "scoring")
        gen_f, gt_f = self._features(seq, mask, layout, rollout, copies)
        D = gen_f.shape[-1]
        groups_gen = to_groups(gen_f, n)  # [B·NB, n, D]
        groups_valid = layout.valid.reshape(-1)
        out = compute_rewards(groups_gen, gt_f.reshape(B * layout.NB, D),
                              alignment_coef=float(e.alignment_coef), diversity_coef=self.diversity_coef,
                              use_whitening=bool(e.use_whitening), valid=groups_valid)
        adv = compute_advantages(out, estimator=self.estimator, alignment_coef=float(e.alignment_coef),
                                 diversity_coef=self.diversity_coef)  # [B·NB, n]
        adv = from_groups(adv, B).float()  # [B·n, NB]

        # 3. training forward with the same mask; log-probs at the index map (logits / τ)
        report_phase(self, "training")
        head = lm_head(model)
        hidden = forward_with_mask(model, seq, run.position_ids, mask)  # [B·copies, T', H]
        logp, entropy = gather_logprobs(hidden, head, run.pred_index, tokens_x,
                                        temperature=float(e.temperature), chunk_size=LM_HEAD_CHUNK)
        logp, entropy = unfold_samples(logp, n // copies), unfold_samples(entropy, n // copies)  # [B·n, NB, G]
        rl = rl_loss(logp, adv, valid)
        # CE on the ground truth (τ = 1), on the document part of each row
        ce_coef = float(e.ce_coef)
        rows_ce, tgt_ce, m_ce = ce_positions(labels, lengths)
        with torch.set_grad_enabled(ce_coef != 0.0 and torch.is_grad_enabled()):
            logp_ce, _ = gather_logprobs(hidden[::copies, :S], head, rows_ce, tgt_ce, temperature=1.0,
                                         chunk_size=LM_HEAD_CHUNK)
            ce = ce_loss(logp_ce, m_ce) if bool(m_ce.any()) else hidden.new_zeros((), dtype=torch.float32)
        loss = float(e.rl_coef) * rl + (ce_coef * ce if ce_coef != 0.0 else 0.0)
        (loss / n_micro).backward()

        tok_valid = valid.unsqueeze(-1).expand_as(entropy)
        metrics = {
            **reward_metrics(out, groups_valid),
            "entropy": float(entropy[tok_valid].mean()),
            "loss": float(loss.detach()),
            "rl_loss": float(rl.detach()),
            "ce_loss": float(ce.detach()),
            "n_whitening_fallback": int(out.n_whitening_fallback),
            **counts,
        }
        return metrics, int(seq.numel()), True
