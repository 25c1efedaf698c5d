"""Structured mode (sync and async): rollouts from the generation server -> feature rewards -> GRPO.

One optimizer step, in order (engine-math.md §8, vllm-integration.md §7):

1. Rollouts. Each prompt is rendered with the chat template (and `trl.chat_template_kwargs`),
   cut from the left so prompt + max_tokens fits the server's max_model_len, and sent as token ids
   for `num_generations` completions (max_tokens per prompt = GT length x gt_length_multiplier,
   capped by max_completion_length, when `ebft.adaptive_max_tokens`). Rows with
   `remaining_turns` are extended turn by turn, each completion with its own history.
2. Rewards. The frozen feature network (the base model: adapter disabled, or a frozen copy for a
   full fine-tune) reads token ids as generated (prompt ids + completion ids, trailing stop ids
   dropped; no decode/re-encode) and the GT side (prompt ids + GT ids, once per group); pooled
   features give alignment, diversity and CFM per group (`rewards.py`).
3. Advantages: `trl.scale_rewards` group normalisation (`advantages.scale_group_rewards`).
4. Loss (TRL's GRPO with one iteration): per token ρ = exp(logp − logp.detach()) (≡ 1, gradient
   of logp), −min(ρA, clip(ρ, 1−ε, 1+ε_high)·A) times the importance weight exp(logp_old −
   logp_server) clamped to [1/cap, cap] (the server sampled from slightly different weights or
   numerics); log-probs at the sampling temperature; `grpo` = token mean per sequence, then the
   mean over the step's sequences. Backward per micro-batch of `micro_batch_size` sequences;
   micro-batches whose advantages are all zero are skipped with `skip_zero_advantage_batches`.
5. After the optimizer step, every `vllm_sync_interval` steps the weights are published
   (`rollout/weight_sync.py`: versioned LoRA adapters, or a full reload) and generation switches
   to them. `staleness` = updates before this step − updates in the policy that generated it.

Async (`trl.async_prefetch`): the next step's batch is generated in a background thread while
this step trains (`rollout/prefetch.py`), never more than `vllm_sync_interval` updates behind.
To have the next rows in time, the first step takes two steps' rows (`rows_per_step` is 2x once)
and the last one none: the loop still sees one batch per step, in data order.
`streaming_partial_batch` scores each group as soon as its completions arrive.

Multi-turn rows (`remaining_turns`: the messages after the first assistant turn): completion i
continues its own conversation: each later user turn is appended (with the template's glue
between turns) and the next assistant turn generated (n=1) with the same policy. Rewards compare
the features of the whole generated conversation with the GT conversation (prompt + GT turns);
the completion mask (for `completion_mean`) covers assistant tokens only. Only the first turn's
tokens carry the policy-gradient loss; later turns shape the reward.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from ebft_engine.stepper import StepResult, report_phase

SENTINEL = "\ue000ebft-turn\ue001"
"""Stands in for an assistant turn's content while finding the chat template's glue text."""


class StructuredError(RuntimeError):
    """A row or setting structured mode cannot use; the message says which and what to do."""


@dataclass
class FeatSeq:
    """A sequence for the feature pass: token ids and which of them are completion tokens."""

    ids: list[int]
    completion: list[bool]


@dataclass
class Group:
    """One prompt, its n completions (turn 1 carries the loss) and the feature sequences."""

    row_index: int
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    """Turn-1 ids as sampled, stop id included (the loss learns to stop)."""
    server_logprobs: list[list[float]]
    finish_reasons: list[str]
    gen_feats: list[FeatSeq]
    gt_feat: FeatSeq
    turns: int = 1
    requests: list[list[int]] = field(default_factory=list)


def _cfg(cfg: Any, dotted: str, default: Any = None) -> Any:
    cur = cfg
    for part in dotted.split("."):
        if cur is None:
            return default
        cur = cur.get(part) if isinstance(cur, dict) else getattr(cur, part, None)
    return default if cur is None else cur


class StructuredStepper:
    """The Stepper of structured mode (see the module docstring for the step)."""

    def __init__(self, cfg: Any, model: Any, tokenizer: Any, device: Any, dtype: Any, *,
                 client: Any = None):
        from ebft_engine.data import chat_template_kwargs
        from ebft_engine.features import (feature_layer_indices, is_peft_model, make_frozen_copy,
                                          num_decoder_layers)
        from ebft_engine.rollout import vllm_launcher as launcher
        from ebft_engine.rollout.client import GenerationClient, Timeouts

        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.dtype = dtype
        self.n = int(_cfg(cfg, "trl.num_generations"))
        self.mbs = int(_cfg(cfg, "micro_batch_size", 1))
        self.ga = int(_cfg(cfg, "gradient_accumulation_steps", 1))
        self.rows = max(1, self.mbs * self.ga // self.n)
        self.max_steps = int(_cfg(cfg, "max_steps", 0) or 0)
        self.temperature = float(_cfg(cfg, "trl.temperature", 0.7))
        self.top_p = float(_cfg(cfg, "trl.top_p", 1.0))
        self.top_k = int(_cfg(cfg, "trl.top_k", 0) or 0)
        self.min_p = float(_cfg(cfg, "trl.min_p", 0.0) or 0.0)
        self.max_completion = int(_cfg(cfg, "trl.max_completion_length", 256))
        self.adaptive = bool(_cfg(cfg, "ebft.adaptive_max_tokens", True))
        self.gt_mult = max(0.1, float(_cfg(cfg, "ebft.gt_length_multiplier", 1.5)))
        self.sync_interval = max(1, int(_cfg(cfg, "trl.vllm_sync_interval", 1)))
        self.async_mode = bool(_cfg(cfg, "trl.async_prefetch", False))
        self.streaming = self.async_mode and bool(_cfg(cfg, "trl.streaming_partial_batch", False))
        self.skip_zero = bool(_cfg(cfg, "trl.skip_zero_advantage_batches", False))
        self.scale_rewards = _cfg(cfg, "trl.scale_rewards", True)
        self.loss_type = str(_cfg(cfg, "trl.loss_type", "grpo"))
        self.eps_low = float(_cfg(cfg, "trl.epsilon", 0.2))
        self.eps_high = float(_cfg(cfg, "trl.epsilon_high", None) or self.eps_low)
        self.is_cap = max(1.0, float(_cfg(cfg, "trl.importance_sampling_cap", 3.0)))
        self.embed_method = str(_cfg(cfg, "ebft.embed_method", "last_token"))
        self.chat_kwargs = chat_template_kwargs(cfg)
        self.seed = int(_cfg(cfg, "seed", 42))
        self.stop_ids = self._stop_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        # the frozen feature network: the base weights (adapter off), or a frozen copy
        self.peft = is_peft_model(model)
        self.feature_model = model if self.peft else make_frozen_copy(model)
        self.layers = feature_layer_indices(list(_cfg(cfg, "ebft.feature_layers", [0.25, 0.5, 0.75])),
                                            num_decoder_layers(model))

        # the server: started separately (`ebft serve`); wait for it, clearly
        url = os.environ.get("EBFT_SERVER_URL")
        if not url:
            port = launcher.server_port(cfg)
            if port == 0:
                raise StructuredError(
                    "trl.vllm_server_port is 0 (any free port): the trainer cannot guess which port "
                    "the server took. Start both with `ebft run` (it passes the port), or set "
                    "trl.vllm_server_port to the port `ebft serve` printed, or EBFT_SERVER_URL.")
            url = launcher.base_url(launcher.client_host(cfg), port)
        self.log_path = os.environ.get("EBFT_SERVER_LOG")
        timeout_s = float(_cfg(cfg, "trl.vllm_server_timeout", 600))
        self.client = client or GenerationClient(url, Timeouts(read_cap=max(900.0, timeout_s)),
                                                 log_path=self.log_path)
        waited = self.client.wait_for_health(timeout=timeout_s)
        self.base_name = self.client.base_model_name()
        self.max_model_len = self.client.max_model_len() or launcher.max_model_len(cfg)
        if self.max_model_len <= 1:
            raise StructuredError(f"the server's max_model_len is {self.max_model_len}")
        print(f"generation server {self.client.hostport} healthy after {waited:.1f}s: serving "
              f"'{self.base_name}', max_model_len {self.max_model_len}", flush=True)

        self._check_server(model)

        # weight sync
        from ebft_engine.rollout.protocol import POLICY_PREFIX
        from ebft_engine.rollout.weight_sync import FullSync, LoRASync, lora_sync_problems

        run_dir = Path(str(_cfg(cfg, "output_dir", ".") or ".")).expanduser()
        for m in self.client.models():  # adapters left by an earlier run of this server
            if str(m.get("id", "")).startswith(POLICY_PREFIX):
                self.client.unload_lora(m["id"])
        if self.peft and bool(_cfg(cfg, "trl.vllm_lora_sync", False)):
            problems = lora_sync_problems(model)
            if problems:
                raise StructuredError("trl.vllm_lora_sync: this adapter cannot be served by "
                                      "runtime LoRA: " + "; ".join(problems))
            self.sync: Any = LoRASync(self.client, run_dir / "lora-sync", keep=2)
        else:
            self.sync = FullSync(self.client, run_dir / "weight-sync")
        self.sync.current_name = self.base_name  # until the first sync: the base weights
        self._pending_sync_s = 0.0
        self._truncation_warned = False
        self._first_step: int | None = None
        self._last_step: int | None = None

        # async
        self.prefetcher = None
        self._next_submit = None  # first step whose rows have not been submitted
        if self.async_mode:
            from ebft_engine.rollout.prefetch import Prefetcher

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
        metrics: dict[str, float] = {}
        report_phase(self, "generating")
        if self.async_mode:
            if self._next_submit is None:
                self._next_submit = step
            rows = list(rows)
            for i in range(0, len(rows), self.rows):
                self.prefetcher.submit(rows[i:i + self.rows], self._next_submit)
                self._next_submit += 1
            handle = self.prefetcher.get(step)
            groups_iter = handle.groups()
            policy_name, version = handle.policy_name, handle.policy_version
        else:
            policy_name, version = self._policy()
            groups_iter = self._produce(list(rows), step, policy_name)
            handle = None

        # score groups as they come (all at once unless streaming)
        t_gen = time.perf_counter()
        groups: list[Group] = []
        rewards_parts = []
        if self.streaming:
            for g in groups_iter:
                groups.append(g)
                rewards_parts.append(self._score([g]))
        else:
            groups = list(groups_iter)
            gen_time = time.perf_counter() - t_gen
            report_phase(self, "scoring")
            rewards_parts.append(self._score(groups))
        if handle is not None:
            gen_wait = handle.wait_s
            gen_time = (handle.finished or time.monotonic()) - handle.started
        else:
            gen_wait = gen_time
        if not groups:
            raise StructuredError(f"step {step}: no prompts to train on")
        out = _cat_rewards(rewards_parts)

        from ebft_engine.advantages import scale_group_rewards
        from ebft_engine.rewards import reward_metrics

        metrics.update(reward_metrics(out))
        adv = scale_group_rewards(out.rewards.float(), self._scale_mode())
        report_phase(self, "training")
        loss_metrics, n_tokens, skipped = self._backward(groups, adv)
        metrics.update(loss_metrics)
        lengths = [len(c) for g in groups for c in g.completion_ids]
        metrics.update({
            "gen_wait_s": float(gen_wait),
            "gen_time_s": float(gen_time),
            "staleness": float((step - 1) - version),
            "sync_version": float(version),
            "sync_s": float(self._pending_sync_s),
            "completion_length": sum(lengths) / max(1, len(lengths)),
            "truncated_frac": sum(r == "length" for g in groups for r in g.finish_reasons)
                              / max(1, len(lengths)),
            "step_rollout_s": float(time.perf_counter() - t_start),
        })
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

    def _scale_mode(self):
        v = self.scale_rewards
        return v if isinstance(v, (bool, str)) else bool(v)

    # -- rollouts (runs in the producer thread in async mode: no model access here) ---------------

    def _check_server(self, model: Any) -> None:
        """Refuse a server whose log-probs or LoRA limits do not fit this run; warn on the rest."""
        from ebft_engine.rollout.capabilities import check_server_config

        lora_rank = None
        if self.peft and bool(_cfg(self.cfg, "trl.vllm_lora_sync", False)):
            lora_rank = int(_cfg(self.cfg, "lora_r", 16))
        plain = (self.temperature == 1.0 and self.top_p >= 1.0 and self.top_k <= 0
                 and self.min_p <= 0.0)
        dtype = self.dtype if self.dtype is not None else next(model.parameters()).dtype
        check = check_server_config(self.client.server_config(),
                                    trainer_dtype=str(dtype).removeprefix("torch."),
                                    lora_rank=lora_rank, sampling_is_plain=plain)
        for message in check.warnings:
            warnings.warn(message, stacklevel=2)
        if check.errors:
            raise StructuredError(" ".join(check.errors))

    def _stop_ids(self) -> list[int]:
        explicit = _cfg(self.cfg, "trl.generation_kwargs.stop_token_ids", None)
        ids = list(explicit) if explicit else []
        eos = self.tokenizer.eos_token_id
        if not ids and eos is not None:
            ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        return [int(i) for i in ids]

    def _strip_stop(self, ids: Sequence[int]) -> list[int]:
        out = list(ids)
        stops = set(self.stop_ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            stops |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
        while out and out[-1] in stops:
            out.pop()
        return out

    def _max_tokens(self, gt_len: int) -> int:
        mt = self.max_completion
        if self.adaptive:
            mt = min(mt, max(1, math.ceil(gt_len * self.gt_mult)))
        return max(1, min(mt, self.max_model_len - 1))

    def _fit_prompt(self, prompt: list[int], max_tokens: int) -> list[int]:
        room = self.max_model_len - max_tokens
        if len(prompt) <= room:
            return prompt
        if not self._truncation_warned:
            self._truncation_warned = True
            warnings.warn(f"a prompt of {len(prompt)} tokens was cut from the left to {room} so that "
                          f"prompt + max_tokens fits max_model_len {self.max_model_len}; raise "
                          "vllm.max_model_len to keep whole prompts", stacklevel=3)
        return prompt[-room:]

    def _fit_feature(self, ids: list[int], mask: list[bool]) -> FeatSeq:
        """Cut a feature sequence to max_model_len from the left (the prompt side)."""
        limit = self.max_model_len
        if len(ids) > limit:
            ids, mask = ids[-limit:], mask[-limit:]
        return FeatSeq(ids, mask)

    def _encode(self, text: str) -> list[int]:
        from ebft_engine.data import encode_text

        return encode_text(self.tokenizer, text or "")

    def _produce(self, rows: list[dict], step: int, policy_name: str) -> Iterator[Group]:
        """Generate and assemble the groups of `rows` with the served policy `policy_name`."""
        from ebft_engine.data import render_prompt_ids

        prompts, gts, mts = [], [], []
        for i, row in enumerate(rows):
            if "prompt" not in row or "ground_truth" not in row:
                raise StructuredError(f"structured mode needs rows with `prompt` and `ground_truth`; "
                                      f"row {i} of step {step} has {sorted(row)}")
            gt = self._encode(row["ground_truth"])
            mt = self._max_tokens(len(gt))
            prompts.append(self._fit_prompt(render_prompt_ids(self.tokenizer, row["prompt"],
                                                              self.chat_kwargs), mt))
            gts.append(gt)
            mts.append(mt)
        seed = self.seed * 100_003 + step * 1_009
        stream = self.client.completions_stream(
            prompts, self.n, mts, self.temperature, self.top_p, self.stop_ids, policy_name,
            top_k=self.top_k, min_p=self.min_p, seed=seed, per_prompt=self.streaming)
        if self.streaming:  # a group is complete as soon as its request returns
            for idx, comps in stream:
                for i in idx:
                    yield from self._assemble([rows[i]], [i], [prompts[i]], [gts[i]],
                                              [c for c in comps if c.prompt_idx == i], policy_name,
                                              seed)
            return
        comps = sorted((c for _, cs in stream for c in cs), key=lambda c: (c.prompt_idx,
                                                                             c.sample_idx))
        yield from self._assemble(rows, list(range(len(rows))), prompts, gts, comps, policy_name,
                                  seed)

    def _assemble(self, rows, indices, prompts, gts, comps, policy_name, seed) -> Iterator[Group]:
        n = self.n
        groups = []
        for k, (row, i, prompt, gt) in enumerate(zip(rows, indices, prompts, gts)):
            mine = [c for c in comps if c.prompt_idx == i]
            mine.sort(key=lambda c: c.sample_idx)
            if len(mine) != n:
                raise StructuredError(f"the server returned {len(mine)} completions for prompt {i}, "
                                      f"expected {n}")
            gen_feats = []
            for c in mine:
                body = self._strip_stop(c.token_ids)
                gen_feats.append(self._fit_feature(prompt + body, [False] * len(prompt)
                                                   + [True] * len(body)))
            gt_feat = self._fit_feature(prompt + gt, [False] * len(prompt) + [True] * len(gt))
            groups.append(Group(row_index=i, prompt_ids=prompt,
                                completion_ids=[list(c.token_ids) for c in mine],
                                server_logprobs=[list(c.logprobs) for c in mine],
                                finish_reasons=[c.finish_reason for c in mine],
                                gen_feats=gen_feats, gt_feat=gt_feat))
        turns = [_remaining_turns(r) for r in rows]
        if any(turns):
            self._multiturn(rows, turns, groups, policy_name, seed)
        yield from groups

    # -- multi-turn ------------------------------------------------------------------------------

    def _glue(self, history: list[dict], pending: list[dict]) -> list[int]:
        """Ids the chat template puts between an assistant turn's content and the next assistant
        turn's content (end of turn, the next user messages, the assistant header)."""
        from ebft_engine.data import render_chat

        text = render_chat(self.tokenizer, history + [{"role": "assistant", "content": SENTINEL}]
                           + pending, add_generation_prompt=True,
                           chat_template_kwargs=self.chat_kwargs)
        at = text.rfind(SENTINEL)
        if at < 0:
            raise StructuredError("multi-turn rows need a chat template that renders earlier "
                                  "assistant turns; this one dropped an assistant message")
        return self._encode(text[at + len(SENTINEL):])

    def _multiturn(self, rows, turns, groups: list[Group], policy_name: str, seed: int) -> None:
        """Extend every completion of rows with remaining turns, each with its own history."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise StructuredError("rows have `remaining_turns`, which needs a chat template "
                                  "(set `chat_template` in the config)")
        convs = []  # one per completion: dict(ids, mask, history, plan, done)
        for g, row, plan in zip(groups, rows, turns):
            first = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) \
                else list(row["prompt"])
            segments = _turn_plan(plan)
            # the GT conversation: prompt + GT turn 1 + (glue + GT turn)...
            gt_ids, gt_mask = list(g.gt_feat.ids), list(g.gt_feat.completion)
            hist = first + [{"role": "assistant", "content": row["ground_truth"]}]
            for pending, answer in segments:
                glue = self._glue(hist, pending)
                body = self._encode(answer)
                gt_ids += glue + body
                gt_mask += [False] * len(glue) + [True] * len(body)
                hist = hist + pending + [{"role": "assistant", "content": answer}]
            g.gt_feat = self._fit_feature(gt_ids, gt_mask)
            g.turns = 1 + len(segments)
            for j in range(self.n):
                body = self._strip_stop(g.completion_ids[j])
                convs.append({"group": g, "j": j, "ids": g.prompt_ids + body,
                              "mask": [False] * len(g.prompt_ids) + [True] * len(body),
                              "history": first + [{"role": "assistant",
                                                   "content": self.tokenizer.decode(body)}],
                              "segments": segments, "done": not segments})
        turn = 0
        while True:
            turn += 1
            active = [c for c in convs if not c["done"] and turn - 1 < len(c["segments"])]
            if not active:
                break
            prompts, mts, keep = [], [], []
            for c in active:
                pending, answer = c["segments"][turn - 1]
                glue = self._glue(c["history"], pending)
                ids = c["ids"] + glue
                mt = self._max_tokens(len(self._encode(answer)))
                mt = min(mt, self.max_model_len - len(ids))
                if mt < 1:  # no room left for this conversation: it ends here
                    c["done"] = True
                    continue
                c["ids"], c["mask"] = ids, c["mask"] + [False] * len(glue)
                c["history"] = c["history"] + pending
                prompts.append(ids)
                mts.append(mt)
                keep.append(c)
            if not keep:
                continue
            comps = self.client.completions(prompts, 1, mts, self.temperature, self.top_p,
                                            self.stop_ids, policy_name, top_k=self.top_k,
                                            min_p=self.min_p, seed=seed + 7_919 * turn)
            for c, prompt, comp in zip(keep, prompts, comps):
                body = self._strip_stop(comp.token_ids)
                c["ids"] = c["ids"] + body
                c["mask"] = c["mask"] + [True] * len(body)
                c["history"] = c["history"] + [{"role": "assistant",
                                                "content": self.tokenizer.decode(body)}]
                c["group"].requests.append(list(prompt))
        for c in convs:
            c["group"].gen_feats[c["j"]] = self._fit_feature(c["ids"], c["mask"])

    # -- rewards ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, groups: list[Group]):
        from ebft_engine.rewards import compute_rewards

        gen = self._pooled([f for g in groups for f in g.gen_feats])
        gt = self._pooled([g.gt_feat for g in groups])
        G = len(groups)
        return compute_rewards(gen.view(G, self.n, -1), gt,
                               alignment_coef=float(_cfg(self.cfg, "ebft.alignment_coef", 1.0)),
                               diversity_coef=float(_cfg(self.cfg, "ebft.diversity_coef", 1.0)),
                               use_whitening=bool(_cfg(self.cfg, "ebft.use_whitening", False)))

    def _pooled(self, seqs: list[FeatSeq]) -> torch.Tensor:
        from ebft_engine.features import frozen_feature_model, pool, token_features

        out = []
        chunk = max(1, self.mbs)
        with frozen_feature_model(self.feature_model) as fm:
            for i in range(0, len(seqs), chunk):
                part = seqs[i:i + chunk]
                ids, real, comp = _pad([s.ids for s in part], [s.completion for s in part],
                                       self.pad_id, self.device)
                feats = token_features(fm, ids, attention_mask=real.long(),
                                       layer_indices=self.layers)
                out.append(pool(feats, real, self.embed_method, comp).float())
        return torch.cat(out, dim=0)

    # -- loss ------------------------------------------------------------------------------------

    def _backward(self, groups: list[Group], adv: torch.Tensor):
        samples = [(gi, j) for gi in range(len(groups)) for j in range(self.n)]
        n_seq = len(samples)
        n_tok_total = sum(len(groups[gi].completion_ids[j]) for gi, j in samples)
        loss_sum, entropy_sum, ent_count = 0.0, 0.0, 0
        is_min, is_max, clipped_w = math.inf, -math.inf, 0
        n_tokens, n_skipped, n_mb = 0, 0, 0
        self.model.train()
        for s in range(0, n_seq, self.mbs):
            mb = samples[s:s + self.mbs]
            n_mb += 1
            a = torch.stack([adv[gi, j] for gi, j in mb]).to(self.device, torch.float32)
            if self.skip_zero and bool((a == 0).all()):
                n_skipped += 1
                continue
            prompts = [groups[gi].prompt_ids for gi, _ in mb]
            comps = [groups[gi].completion_ids[j] for gi, j in mb]
            server = [groups[gi].server_logprobs[j] for gi, j in mb]
            ids, real, _ = _pad([p + c for p, c in zip(prompts, comps)], None, self.pad_id,
                                self.device)
            n_tokens += int(real.sum())
            C = max(len(c) for c in comps)
            pos = torch.zeros(len(mb), C, dtype=torch.long, device=self.device)
            tok = torch.zeros(len(mb), C, dtype=torch.long, device=self.device)
            cmask = torch.zeros(len(mb), C, dtype=torch.bool, device=self.device)
            old_server = torch.zeros(len(mb), C, dtype=torch.float32, device=self.device)
            for b, (p, c, lp) in enumerate(zip(prompts, comps, server)):
                L = len(c)
                pos[b, :L] = torch.arange(len(p) - 1, len(p) - 1 + L, device=self.device)
                tok[b, :L] = torch.tensor(c, device=self.device)
                cmask[b, :L] = True
                old_server[b, :L] = torch.tensor(lp, dtype=torch.float32, device=self.device)
            logits = self.model(input_ids=ids, attention_mask=real.long()).logits
            V = logits.shape[-1]
            sel = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, V)).float() / self.temperature
            logp_all = F.log_softmax(sel, dim=-1)
            logp = logp_all.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
            with torch.no_grad():
                ent = -(logp_all.exp() * logp_all).sum(-1)
                entropy_sum += float(ent[cmask].sum())
                ent_count += int(cmask.sum())
            old = logp.detach()
            raw_w = torch.exp(old - old_server)
            w = raw_w.clamp(1.0 / self.is_cap, self.is_cap)
            with torch.no_grad():
                is_min = min(is_min, float(raw_w[cmask].min()))
                is_max = max(is_max, float(raw_w[cmask].max()))
                clipped_w += int(((raw_w != w) & cmask).sum())
            ratio = torch.exp(logp - old)
            A = a.unsqueeze(-1)
            per_tok = -torch.min(ratio * A, ratio.clamp(1 - self.eps_low, 1 + self.eps_high) * A) * w
            per_tok = per_tok * cmask
            if self.loss_type == "bnpo":
                loss = per_tok.sum() / max(1, n_tok_total)
            elif self.loss_type == "dr_grpo":
                loss = per_tok.sum() / (n_seq * self.max_completion)
            else:  # grpo: token mean per sequence, then mean over the step's sequences
                loss = (per_tok.sum(-1) / cmask.sum(-1).clamp_min(1)).sum() / n_seq
            loss.backward()
            loss_sum += float(loss.detach())
        metrics = {
            "loss": loss_sum,
            "entropy": entropy_sum / ent_count if ent_count else math.nan,
            "is_ratio_min": is_min if math.isfinite(is_min) else math.nan,
            "is_ratio_max": is_max if math.isfinite(is_max) else math.nan,
            "is_clipped_frac": clipped_w / ent_count if ent_count else 0.0,
            "skipped_microbatches": float(n_skipped),
            "zero_adv_frac": float((adv == 0).float().mean()),
        }
        return metrics, n_tokens, n_mb > 0 and n_skipped == n_mb


# ------------------------------------------------------------------------------------------------


def _pad(seqs: list[list[int]], masks: list[list[bool]] | None, pad_id: int, device):
    """Right-pad to [B, L]: ids, real-token mask, and the completion mask (or None)."""
    L = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    comp = torch.zeros(B, L, dtype=torch.bool) if masks is not None else None
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        real[b, :len(s)] = True
        if comp is not None:
            comp[b, :len(s)] = torch.tensor(masks[b], dtype=torch.bool)
    return ids.to(device), real.to(device), (comp.to(device) if comp is not None else None)


def _cat_rewards(parts):
    """Concatenate RewardOutputs of disjoint groups along the group axis."""
    if len(parts) == 1:
        return parts[0]
    from ebft_engine.rewards import RewardOutput

    return RewardOutput(rewards=torch.cat([p.rewards for p in parts]),
                        alignment=torch.cat([p.alignment for p in parts]),
                        diversity=torch.cat([p.diversity for p in parts]),
                        cfm=torch.cat([p.cfm for p in parts]),
                        n_whitening_fallback=sum(p.n_whitening_fallback for p in parts),
                        n_eigh_fallback=sum(p.n_eigh_fallback for p in parts))


def _remaining_turns(row: dict) -> list[dict]:
    turns = row.get("remaining_turns")
    if not turns:
        return []
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except ValueError as e:
            raise StructuredError(f"remaining_turns is a string but not JSON: {e}") from e
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "role" in t for t in turns):
        raise StructuredError("remaining_turns must be a list of chat messages "
                              "({role, content}) following the first assistant turn")
    return turns


def _turn_plan(turns: list[dict]) -> list[tuple[list[dict], str]]:
    """[(messages before an assistant turn, that turn's GT content)]; trailing non-assistant
    messages (nothing to generate after them) are dropped."""
    plan, pending = [], []
    for m in turns:
        if m.get("role") == "assistant":
            plan.append((pending, str(m.get("content") or "")))
            pending = []
        else:
            pending.append({"role": m["role"], "content": m.get("content") or ""})
    return plan
