"""The Stepper of structured mode (sync and async), composed from the package's parts.

One optimizer step, in order (engine-math.md §8, vllm-integration.md §7):

1. Rollouts (`rollout.py`, `multiturn.py`): the step's prompts -> n completions each from the
   generation server -> `Group`s.
2. Rewards (`scoring.py`): the frozen feature network scores each group against its GT.
3. Advantages: `trl.scale_rewards` group normalisation (`advantages.scale_group_rewards`).
4. Loss and backward (`update.py`, `loss.py`): GRPO over micro-batches of completions.
5. After the optimizer step, every `vllm_sync_interval` steps the weights are published
   (`rollout/weight_sync.py`: versioned LoRA adapters, or a full reload) and generation switches
   to them. `staleness` = updates before this step − updates in the policy that generated it.

Async (`trl.async_prefetch`): the next step's batch is generated in a background thread while
this step trains (`rollout/prefetch.py`), never more than `vllm_sync_interval` updates behind.
To have the next rows in time, the first step takes two steps' rows (`rows_per_step` is 2x once)
and the last one none: the loop still sees one batch per step, in data order.
`streaming_partial_batch` scores each group as soon as its completions arrive.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import torch

from ebft_engine.advantages import scale_group_rewards
from ebft_engine.config import EbftConfig
from ebft_engine.data import chat_template_kwargs
from ebft_engine.features import is_peft_model
from ebft_engine.rewards import RewardOutput, reward_metrics
from ebft_engine.rollout.prefetch import BatchHandle, Prefetcher
from ebft_engine.stepper import StepResult, report_phase
from ebft_engine.structured.groups import Group, StructuredError
from ebft_engine.structured.loss import LossSettings
from ebft_engine.structured.rollout import Lengths, RolloutBuilder, Sampling, stop_token_ids
from ebft_engine.structured.scoring import FeatureScorer, cat_rewards
from ebft_engine.structured.server import check_server, connect, lora_synced, weight_sync
from ebft_engine.structured.update import backward_groups


class StructuredStepper:
    """The Stepper of structured mode (see the module docstring for the step)."""

    def __init__(self, cfg: EbftConfig, model: Any, tokenizer: Any, device: Any, dtype: Any, *,
                 client: Any = None):
        t = cfg.trl
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.dtype = dtype
        self.sampling = Sampling.from_config(cfg)
        self.n, self.mbs = self.sampling.n, cfg.micro_batch_size
        self.rows = max(1, self.mbs * cfg.gradient_accumulation_steps // self.n)
        self.max_steps = cfg.max_steps or 0
        self.sync_interval = t.vllm_sync_interval
        self.async_mode = t.async_prefetch
        self.streaming = self.async_mode and t.streaming_partial_batch
        self.skip_zero = t.skip_zero_advantage_batches
        self.loss_settings = LossSettings.from_config(cfg)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stop_ids = stop_token_ids(t.generation_kwargs.stop_token_ids, tokenizer)

        # the frozen feature network: the base weights (adapter off), or a frozen copy
        self.peft = is_peft_model(model)
        self.scorer = FeatureScorer(cfg, model, pad_id=self.pad_id, device=self.device)
        self.feature_model = self.scorer.feature_model

        # the server: started separately (`ebft serve`); wait for it, clearly
        server = connect(cfg, client)
        self.client, self.max_model_len = server.client, server.max_model_len
        trainer_dtype = dtype if dtype is not None else next(model.parameters()).dtype
        check_server(self.client, trainer_dtype=str(trainer_dtype).removeprefix("torch."),
                     lora_rank=cfg.lora_r if lora_synced(cfg, self.peft) else None,
                     sampling_is_plain=self.sampling.is_plain)
        lengths = Lengths(self.max_model_len, int(t.max_completion_length), cfg.ebft.adaptive_max_tokens,
                          cfg.ebft.gt_length_multiplier)
        self.rollouts = RolloutBuilder(tokenizer, self.client, self.sampling, lengths, stop_ids=stop_ids,
                                       chat_kwargs=chat_template_kwargs(cfg), seed=cfg.seed,
                                       streaming=self.streaming)
        self.sync = weight_sync(cfg, server, model, self.peft)
        self._pending_sync_s = 0.0
        self._first_step: int | None = None
        self._last_step: int | None = None

        # async
        self.prefetcher = None
        self._next_submit: int | None = None  # first step whose rows have not been submitted
        if self.async_mode:
            self.prefetcher = Prefetcher(self._produce, self._policy, self.sync_interval)

    # -- the Stepper protocol --------------------------------------------------------------------

    @property
    def rows_per_step(self) -> int:
        """Prompts per step; in async mode twice that at the first step (the lookahead) and none
        at the last (its rows were taken one step earlier)."""
        if not self.async_mode:
            return self.rows
        if self._next_submit is None:
            return 2 * self.rows if self.max_steps != 1 else self.rows
        if self.max_steps and self._next_submit > self.max_steps:
            return 0
        return self.rows

    @property
    def rows_in_flight(self) -> int:
        """Rows submitted for steps after the last one run (async lookahead): a checkpoint gives
        them back to the data order so a resumed run does not skip them."""
        if not self.async_mode or self._next_submit is None or self._last_step is None:
            return 0
        return max(0, self._next_submit - self._last_step - 1) * self.rows

    def run_step(self, rows: Sequence[dict[str, Any]], step: int) -> StepResult:
        t_start = time.perf_counter()
        self._last_step = step
        if self._first_step is None:
            self._first_step = step
            if step > 1:  # resumed from a checkpoint: serve the restored weights first
                self._publish(step - 1)
        report_phase(self, "generating")
        groups, rewards, timing = self._rollouts_and_rewards(list(rows), step)
        metrics: dict[str, float] = dict(reward_metrics(rewards))
        adv = scale_group_rewards(rewards.rewards.float(), self._scale_mode())
        report_phase(self, "training")
        loss_metrics, n_tokens, skipped = self._backward(groups, adv)
        metrics.update(loss_metrics)
        metrics.update(timing)
        metrics["sync_s"] = float(self._pending_sync_s)
        metrics.update(rollout_metrics(groups))
        metrics["step_rollout_s"] = float(time.perf_counter() - t_start)
        self._pending_sync_s = 0.0
        return StepResult(metrics=metrics, n_tokens=n_tokens, skipped=skipped)

    def after_optimizer_step(self, step: int) -> None:
        if step % self.sync_interval == 0 and not (self.max_steps and step >= self.max_steps):
            self._publish(step)

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        try:
            self.client.retries = 0
            self.sync.close(unload=True)
        except Exception:  # noqa: BLE001 - the server may already be gone
            pass

    # -- one step's parts ------------------------------------------------------------------------

    def _rollouts_and_rewards(self, rows: list[dict], step: int) -> tuple[list[Group], RewardOutput, dict]:
        """This step's groups (generated now, or by the async producer) and their rewards; the
        timing metrics say how long generation took and how long the trainer waited for it."""
        handle = self._submit(rows, step) if self.async_mode else None
        if handle is not None:
            groups_iter, version = handle.groups(), handle.policy_version
        else:
            policy_name, version = self._policy()
            groups_iter = self._produce(rows, step, policy_name)
        t_gen = time.perf_counter()
        if self.streaming:  # (async only) score each group as soon as it arrives
            groups, parts = [], []
            for g in groups_iter:
                groups.append(g)
                parts.append(self.scorer.score([g]))
        else:
            groups = list(groups_iter)
            gen_time = time.perf_counter() - t_gen
            report_phase(self, "scoring")
            parts = [self.scorer.score(groups)]
        if handle is not None:
            gen_wait = handle.wait_s
            gen_time = (handle.finished or time.monotonic()) - handle.started
        else:
            gen_wait = gen_time
        if not groups:
            raise StructuredError(f"step {step}: no prompts to train on")
        timing = {"gen_wait_s": float(gen_wait), "gen_time_s": float(gen_time),
                  "staleness": float((step - 1) - version), "sync_version": float(version)}
        return groups, cat_rewards(parts), timing

    def _submit(self, rows: list[dict], step: int) -> BatchHandle:
        """Async: hand this call's rows to the producer (one batch per step, in order); return
        the handle of this step's batch (submitted one step earlier, but at the first step)."""
        if self._next_submit is None:
            self._next_submit = step
        for i in range(0, len(rows), self.rows):
            self.prefetcher.submit(rows[i:i + self.rows], self._next_submit)
            self._next_submit += 1
        return self.prefetcher.get(step)

    def _produce(self, rows: list[dict], step: int, policy_name: str) -> Iterator[Group]:
        """Generate and assemble the groups of `rows` (the async producer thread calls this)."""
        return self.rollouts.produce(rows, step, policy_name)

    def _backward(self, groups: list[Group], adv: torch.Tensor) -> tuple[dict[str, float], int, bool]:
        return backward_groups(self.model, groups, adv, self.loss_settings, micro_batch_size=self.mbs,
                               temperature=self.sampling.temperature, pad_id=self.pad_id,
                               device=self.device, skip_zero=self.skip_zero)

    # -- policy and sync -------------------------------------------------------------------------

    def _policy(self) -> tuple[str, int]:
        return self.sync.current_name, int(self.sync.version)

    def _publish(self, version: int) -> None:
        t0 = time.perf_counter()
        was_training = self.model.training
        self.sync.publish(self.model, version)
        self.model.train(was_training)
        self._pending_sync_s += time.perf_counter() - t0
        if self.prefetcher is not None:
            self.prefetcher.notify_sync()

    def _scale_mode(self) -> bool | str:
        v = self.cfg.trl.scale_rewards
        return v if isinstance(v, (bool, str)) else bool(v)


def rollout_metrics(groups: list[Group]) -> dict[str, float]:
    """Mean completion length and the share of completions cut at max_tokens."""
    lengths = [len(c) for g in groups for c in g.completion_ids]
    truncated = sum(r == "length" for g in groups for r in g.finish_reasons)
    return {"completion_length": sum(lengths) / max(1, len(lengths)),
            "truncated_frac": truncated / max(1, len(lengths))}
