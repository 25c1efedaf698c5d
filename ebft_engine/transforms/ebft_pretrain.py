"""Raw text `{text}` -> `{input_ids, labels, prompt_length: 0}` for strided mode on documents.

Not in the spec's table, which has no transform for its own "unstructured text" use case. The
document is tokenized with the tokenizer's special tokens (e.g. BOS) and cut into consecutive
chunks of `sequence_len` tokens, one row each (axolotl truncates and loses the rest). Labels are
the ids: every token may be an anchor's ground truth.
"""

from __future__ import annotations

from typing import Any

from ebft_engine.config import EbftConfig
from ebft_engine.transforms import get_field, require_tokenizer

TRANSFORMS = ("transform",)


def transform(cfg: EbftConfig, **kwargs: Any):
    max_len = cfg.sequence_len

    def transform_fn(example: dict, tokenizer: Any = None) -> dict:
        require_tokenizer(tokenizer, "ebft_pretrain.transform")
        ids = list(tokenizer(get_field(example, "text", "content"), add_special_tokens=True)["input_ids"])
        chunks = [ids[i: i + max_len] for i in range(0, len(ids), max_len)]
        return {"input_ids": chunks, "labels": [list(c) for c in chunks], "prompt_length": [0] * len(chunks)}

    return transform_fn, {"remove_columns": "__all__", "explode": True}
