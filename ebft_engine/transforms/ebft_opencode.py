"""`{input, output}` -> `{prompt, ground_truth}` for structured mode (OpenCodeInstruct, QA pairs).

The prompt is one user message; the chat template is applied later, with the run's
`chat_template_kwargs`, by whoever renders it (generation and the feature pass alike).
"""

from __future__ import annotations

from typing import Any

from ebft_engine.config import EbftConfig
from ebft_engine.transforms import get_field

TRANSFORMS = ("transform",)


def transform(cfg: EbftConfig, **kwargs: Any):
    def transform_fn(example: dict, tokenizer: Any = None) -> dict:
        return {
            "prompt": [{"role": "user", "content": get_field(example, "input")}],
            "ground_truth": get_field(example, "output"),
        }

    return transform_fn, {"remove_columns": "__all__"}
