"""Reasoning data `{messages}` whose assistant content holds `<think>...</think>` -> structured rows.

- `transform`: `prompt` = the messages before the last assistant turn, `ground_truth` = that
  turn's whole content, reasoning included, so features compare thinking and answer (axolotl's
  behaviour). Generate with thinking enabled for like-for-like features.
- `transform_answer_only`: the same with every `<think>...</think>` block removed from the
  ground truth, for when reasoning may differ but the answer should match.
"""

from __future__ import annotations

import re
from typing import Any

from ebft_engine.config import EbftConfig
from ebft_engine.transforms import get_messages

TRANSFORMS = ("transform", "transform_answer_only")
_THINK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def strip_thinking(text: str) -> str:
    return _THINK.sub("", text).strip()


def _last_turn(example: dict) -> tuple[list[dict], str]:
    messages = get_messages(example)
    positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not positions:
        raise ValueError("the conversation has no assistant message")
    return messages[: positions[-1]], messages[positions[-1]]["content"]


def transform(cfg: EbftConfig, **kwargs: Any):
    def transform_fn(example: dict, tokenizer: Any = None) -> dict:
        prompt, answer = _last_turn(example)
        return {"prompt": prompt, "ground_truth": answer}

    return transform_fn, {"remove_columns": "__all__"}


def transform_answer_only(cfg: EbftConfig, **kwargs: Any):
    def transform_fn(example: dict, tokenizer: Any = None) -> dict:
        prompt, answer = _last_turn(example)
        return {"prompt": prompt, "ground_truth": strip_thinking(answer)}

    return transform_fn, {"remove_columns": "__all__"}
