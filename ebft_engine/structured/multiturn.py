"""Multi-turn rows: each completion continues its own conversation, turn by turn.

A row's `remaining_turns` holds the messages after the first assistant turn. Completion j of the
row continues its own history: each later user turn is appended (with the chat template's glue
between turns) and the next assistant turn generated (n=1) with the same policy. Rewards compare
the features of the whole generated conversation with the GT conversation (prompt + GT turns);
the completion mask (for `completion_mean`) covers assistant tokens only. Only the first turn's
tokens carry the policy-gradient loss; later turns shape the reward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ebft_engine.structured.groups import Group, StructuredError

if TYPE_CHECKING:
    from ebft_engine.structured.rollout import RolloutBuilder

SENTINEL = "\ue000ebft-turn\ue001"
"""Stands in for an assistant turn's content while finding the chat template's glue text."""

TURN_SEED_STRIDE = 7_919
"""Turn t of a step samples with seed (the step's seed + t x this)."""


def remaining_turns(row: dict) -> list[dict]:
    """The row's `remaining_turns` as chat messages ([] when none); JSON text is accepted."""
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


def turn_plan(turns: list[dict]) -> list[tuple[list[dict], str]]:
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


def glue_ids(rollouts: RolloutBuilder, history: list[dict], pending: list[dict]) -> list[int]:
    """Ids the chat template puts between an assistant turn's content and the next assistant
    turn's content (end of turn, the next user messages, the assistant header)."""
    from ebft_engine.data import render_chat

    text = render_chat(rollouts.tokenizer, history + [{"role": "assistant", "content": SENTINEL}]
                       + pending, add_generation_prompt=True, chat_template_kwargs=rollouts.chat_kwargs)
    at = text.rfind(SENTINEL)
    if at < 0:
        raise StructuredError("multi-turn rows need a chat template that renders earlier "
                              "assistant turns; this one dropped an assistant message")
    return rollouts.encode(text[at + len(SENTINEL):])


@dataclass
class Conversation:
    """Completion j of a group, extended turn by turn."""

    group: Group
    j: int
    ids: list[int]
    mask: list[bool]
    history: list[dict]
    segments: list[tuple[list[dict], str]]
    done: bool


def _first_messages(row: dict) -> list[dict]:
    prompt = row["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _gt_conversation(rollouts: RolloutBuilder, group: Group, row: dict,
                     segments: list[tuple[list[dict], str]]) -> None:
    """The group's GT features become prompt + GT turn 1 + (glue + GT turn)..."""
    gt_ids, gt_mask = list(group.gt_feat.ids), list(group.gt_feat.completion)
    hist = _first_messages(row) + [{"role": "assistant", "content": row["ground_truth"]}]
    for pending, answer in segments:
        glue = glue_ids(rollouts, hist, pending)
        body = rollouts.encode(answer)
        gt_ids += glue + body
        gt_mask += [False] * len(glue) + [True] * len(body)
        hist = hist + pending + [{"role": "assistant", "content": answer}]
    group.gt_feat = rollouts.lengths.fit_feature(gt_ids, gt_mask)
    group.turns = 1 + len(segments)


def _start_conversations(rollouts: RolloutBuilder, group: Group, row: dict,
                         segments: list[tuple[list[dict], str]]) -> list[Conversation]:
    """One conversation per completion, holding its own turn-1 answer."""
    out = []
    for j in range(rollouts.sampling.n):
        body = rollouts.strip_stop(group.completion_ids[j])
        history = _first_messages(row) + [{"role": "assistant", "content": rollouts.tokenizer.decode(body)}]
        out.append(Conversation(group, j, group.prompt_ids + body,
                                [False] * len(group.prompt_ids) + [True] * len(body), history,
                                segments, done=not segments))
    return out


def _next_turn(rollouts: RolloutBuilder, convs: list[Conversation], turn: int, policy_name: str,
               seed: int) -> bool:
    """Generate assistant turn `turn` + 1 of every conversation that has one; False when none has."""
    active = [c for c in convs if not c.done and turn - 1 < len(c.segments)]
    if not active:
        return False
    prompts, max_tokens, keep = [], [], []
    for c in active:
        pending, answer = c.segments[turn - 1]
        glue = glue_ids(rollouts, c.history, pending)
        ids = c.ids + glue
        mt = min(rollouts.lengths.max_tokens(len(rollouts.encode(answer))),
                 rollouts.lengths.max_model_len - len(ids))
        if mt < 1:  # no room left for this conversation: it ends here
            c.done = True
            continue
        c.ids, c.mask = ids, c.mask + [False] * len(glue)
        c.history = c.history + pending
        prompts.append(ids)
        max_tokens.append(mt)
        keep.append(c)
    if not keep:
        return True
    comps = rollouts.sample_one_each(prompts, max_tokens, policy_name, seed + TURN_SEED_STRIDE * turn)
    for c, prompt, comp in zip(keep, prompts, comps):
        body = rollouts.strip_stop(comp.token_ids)
        c.ids = c.ids + body
        c.mask = c.mask + [True] * len(body)
        c.history = c.history + [{"role": "assistant", "content": rollouts.tokenizer.decode(body)}]
        c.group.requests.append(list(prompt))
    return True


def extend_conversations(rollouts: RolloutBuilder, rows: list[dict], turns: list[list[dict]],
                         groups: list[Group], policy_name: str, seed: int) -> None:
    """Extend every completion of rows with remaining turns, each with its own history; the
    groups' feature sequences become the whole conversations."""
    if getattr(rollouts.tokenizer, "chat_template", None) is None:
        raise StructuredError("rows have `remaining_turns`, which needs a chat template "
                              "(set `chat_template` in the config)")
    convs: list[Conversation] = []
    for group, row, plan in zip(groups, rows, turns):
        segments = turn_plan(plan)
        _gt_conversation(rollouts, group, row, segments)
        convs += _start_conversations(rollouts, group, row, segments)
    turn = 1
    while _next_turn(rollouts, convs, turn, policy_name, seed):
        turn += 1
    for c in convs:
        c.group.gen_feats[c.j] = rollouts.lengths.fit_feature(c.ids, c.mask)
