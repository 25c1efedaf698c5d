"""Multi-turn chat `{messages}` -> structured-mode rows, three ways (as in axolotl):

- `transform`: the first assistant turn is the target: `prompt` = the messages before it,
  `ground_truth` = its content, `remaining_turns` = every message after it (user and assistant
  messages, in order). The trainer rolls the later assistant turns out one after another.
- `transform_last_turn`: `prompt` = the messages before the last assistant turn,
  `ground_truth` = its content; messages after it are dropped.
- `transform_all_turns`: one example per assistant turn, each with its own history as
  `prompt`. The transform returns lists and the loader makes one row of each element.

A conversation without an assistant message is an error (it has nothing to learn from).
`conversations` and ShareGPT's `from`/`value` are accepted for `messages`.
"""

from __future__ import annotations

from typing import Any

from ebft_engine.config import EbftConfig
from ebft_engine.transforms import get_messages

TRANSFORMS = ("transform", "transform_last_turn", "transform_all_turns")


def _assistant_turns(example: dict) -> tuple[list[dict], list[int]]:
    messages = get_messages(example)
    positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not positions:
        raise ValueError("the conversation has no assistant message")
    return messages, positions


def transform(cfg: EbftConfig, **kwargs: Any):
    def transform_fn(example: dict, tokenizer: Any = None) -> dict:
        messages, positions = _assistant_turns(example)
        first = positions[0]
        return {
            "prompt": messages[:first],
            "ground_truth": messages[first]["content"],
            "remaining_turns": messages[first + 1:],
        }

    return transform_fn, {"remove_columns": "__all__"}


def transform_last_turn(cfg: EbftConfig, **kwargs: Any):
    def transform_fn(example: dict, tokenizer: Any = None) -> dict:
        messages, positions = _assistant_turns(example)
        last = positions[-1]
        return {"prompt": messages[:last], "ground_truth": messages[last]["content"]}

    return transform_fn, {"remove_columns": "__all__"}


def transform_all_turns(cfg: EbftConfig, **kwargs: Any):
    def transform_fn(example: dict, tokenizer: Any = None) -> dict:
        messages, positions = _assistant_turns(example)
        return {
            "prompt": [messages[:i] for i in positions],
            "ground_truth": [messages[i]["content"] for i in positions],
        }

    return transform_fn, {"remove_columns": "__all__", "explode": True}
