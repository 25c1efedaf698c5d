"""Rollout assembly: rows -> prompt token ids -> requests to the generation server -> `Group`s.

Each prompt is rendered with the chat template (and `trl.chat_template_kwargs`), cut from the left
so prompt + max_tokens fits the server's max_model_len, and sent as token ids for `num_generations`
completions. max_tokens per prompt = GT length x `ebft.gt_length_multiplier`, capped by
`trl.max_completion_length`, when `ebft.adaptive_max_tokens`. Feature sequences are the token ids
as generated (prompt ids + completion ids, trailing stop ids dropped; no decode/re-encode) and the
GT side (prompt ids + GT ids). Rows with `remaining_turns` continue in `multiturn.py`.

This runs in the producer thread in async mode: it touches the tokenizer and the server client,
never the model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ebft_engine.config import EbftConfig
from ebft_engine.structured.groups import FeatSeq, Group, StructuredError


@dataclass(frozen=True)
class Sampling:
    """What every generation request carries: n, and the sampling distribution."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    """0: off (the schema's unset)."""
    min_p: float
    """0.0: off (the schema's unset)."""

    @classmethod
    def from_config(cls, cfg: EbftConfig) -> Sampling:
        t = cfg.trl
        return cls(n=int(t.num_generations), temperature=t.temperature, top_p=t.top_p,
                   top_k=t.top_k or 0, min_p=t.min_p or 0.0)

    @property
    def is_plain(self) -> bool:
        """Temperature 1 and no truncation: raw and processed log-probs coincide."""
        return self.temperature == 1.0 and self.top_p >= 1.0 and self.top_k <= 0 and self.min_p <= 0.0


@dataclass
class Lengths:
    """Token budgets: max_tokens per prompt, and cuts that fit the server's max_model_len."""

    max_model_len: int
    max_completion: int
    adaptive: bool
    gt_multiplier: float
    truncation_warned: bool = False

    def max_tokens(self, gt_len: int) -> int:
        """max_completion_length, or GT length x multiplier when adaptive; always room for it."""
        mt = self.max_completion
        if self.adaptive:
            mt = min(mt, max(1, math.ceil(gt_len * self.gt_multiplier)))
        return max(1, min(mt, self.max_model_len - 1))

    def fit_prompt(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Cut a prompt from the left so prompt + max_tokens fits (warns once)."""
        room = self.max_model_len - max_tokens
        if len(prompt) <= room:
            return prompt
        if not self.truncation_warned:
            self.truncation_warned = True
            warnings.warn(f"a prompt of {len(prompt)} tokens was cut from the left to {room} so that "
                          f"prompt + max_tokens fits max_model_len {self.max_model_len}; raise "
                          "vllm.max_model_len to keep whole prompts", stacklevel=3)
        return prompt[-room:]

    def fit_feature(self, ids: list[int], mask: list[bool]) -> FeatSeq:
        """Cut a feature sequence to max_model_len from the left (the prompt side)."""
        limit = self.max_model_len
        if len(ids) > limit:
            ids, mask = ids[-limit:], mask[-limit:]
        return FeatSeq(ids, mask)


def _eos_ids(tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def stop_token_ids(explicit: Sequence[int] | None, tokenizer: Any) -> list[int]:
    """`trl.generation_kwargs.stop_token_ids`, else the tokenizer's end-of-sequence ids."""
    ids = list(explicit) if explicit else []
    if not ids:
        ids = _eos_ids(tokenizer)
    return [int(i) for i in ids]


def strip_stop(ids: Sequence[int], stop_ids: Sequence[int], tokenizer: Any) -> list[int]:
    """`ids` without their trailing stop / end-of-sequence ids (the feature side's view)."""
    out = list(ids)
    stops = set(stop_ids) | set(_eos_ids(tokenizer))
    while out and out[-1] in stops:
        out.pop()
    return out


class RolloutBuilder:
    """Turns rows into `Group`s with the served policy (no model access: async-thread safe)."""

    def __init__(self, tokenizer: Any, client: Any, sampling: Sampling, lengths: Lengths, *,
                 stop_ids: list[int], chat_kwargs: dict, seed: int, streaming: bool):
        self.tokenizer, self.client = tokenizer, client
        self.sampling, self.lengths = sampling, lengths
        self.stop_ids, self.chat_kwargs = stop_ids, chat_kwargs
        self.seed, self.streaming = seed, streaming

    def encode(self, text: str) -> list[int]:
        from ebft_engine.data import encode_text

        return encode_text(self.tokenizer, text or "")

    def strip_stop(self, ids: Sequence[int]) -> list[int]:
        return strip_stop(ids, self.stop_ids, self.tokenizer)

    def sample_groups(self, prompts: list[list[int]], max_tokens: list[int], policy_name: str,
                      seed: int):
        """n completions per prompt, streamed as (prompt indices, completions) per request."""
        s = self.sampling
        return self.client.completions_stream(prompts, s.n, max_tokens, s.temperature, s.top_p,
                                              self.stop_ids, policy_name, top_k=s.top_k, min_p=s.min_p,
                                              seed=seed, per_prompt=self.streaming)

    def sample_one_each(self, prompts: list[list[int]], max_tokens: list[int], policy_name: str,
                        seed: int) -> list:
        """One completion per prompt (the next turn of each conversation), in prompt order."""
        s = self.sampling
        return self.client.completions(prompts, 1, max_tokens, s.temperature, s.top_p, self.stop_ids,
                                       policy_name, top_k=s.top_k, min_p=s.min_p, seed=seed)

    def produce(self, rows: list[dict], step: int, policy_name: str) -> Iterator[Group]:
        """Generate and assemble the groups of `rows` with the served policy `policy_name`."""
        from ebft_engine.data import render_prompt_ids
        from ebft_engine.structured.multiturn import extend_conversations, remaining_turns

        prompts, gts, mts = [], [], []
        for i, row in enumerate(rows):
            if "prompt" not in row or "ground_truth" not in row:
                raise StructuredError(f"structured mode needs rows with `prompt` and `ground_truth`; "
                                      f"row {i} of step {step} has {sorted(row)}")
            gt = self.encode(row["ground_truth"])
            mt = self.lengths.max_tokens(len(gt))
            prompts.append(self.lengths.fit_prompt(render_prompt_ids(self.tokenizer, row["prompt"],
                                                                      self.chat_kwargs), mt))
            gts.append(gt)
            mts.append(mt)
        seed = self.seed * 100_003 + step * 1_009
        stream = self.sample_groups(prompts, mts, policy_name, seed)
        if self.streaming:  # a group is complete as soon as its request returns
            for idx, comps in stream:
                for i in idx:
                    group = self._group(i, prompts[i], gts[i], [c for c in comps if c.prompt_idx == i])
                    turns = remaining_turns(rows[i])
                    if turns:
                        extend_conversations(self, [rows[i]], [turns], [group], policy_name, seed)
                    yield group
            return
        comps = sorted((c for _, cs in stream for c in cs), key=lambda c: (c.prompt_idx, c.sample_idx))
        groups = [self._group(i, prompts[i], gts[i], [c for c in comps if c.prompt_idx == i])
                  for i in range(len(rows))]
        turns = [remaining_turns(r) for r in rows]
        if any(turns):
            extend_conversations(self, rows, turns, groups, policy_name, seed)
        yield from groups

    def _group(self, i: int, prompt: list[int], gt: list[int], mine: list) -> Group:
        """One prompt's group from its n completions (in sample order)."""
        mine = sorted(mine, key=lambda c: c.sample_idx)
        if len(mine) != self.sampling.n:
            raise StructuredError(f"the server returned {len(mine)} completions for prompt {i}, "
                                  f"expected {self.sampling.n}")
        gen_feats = []
        for c in mine:
            body = self.strip_stop(c.token_ids)
            gen_feats.append(self.lengths.fit_feature(prompt + body, [False] * len(prompt)
                                                      + [True] * len(body)))
        gt_feat = self.lengths.fit_feature(prompt + gt, [False] * len(prompt) + [True] * len(gt))
        return Group(row_index=i, prompt_ids=prompt,
                     completion_ids=[list(c.token_ids) for c in mine],
                     server_logprobs=[list(c.logprobs) for c in mine],
                     finish_reasons=[c.finish_reason for c in mine],
                     gen_feats=gen_feats, gt_feat=gt_feat)
