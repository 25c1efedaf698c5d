"""`{input, output}` -> `{input_ids, labels, prompt_length}` for strided mode.

The prompt is the input as one user message rendered with the chat template and its generation
prompt, exactly the ids a model answering it would start from; the completion is the output
followed by EOS (the end of an assistant turn). Labels are -100 on the prompt and equal the ids
on the completion, so anchors and CE land on the completion only. Rows are not padded (the
collator pads or packs).

Differences from axolotl's version, on purpose: axolotl tokenizes the raw input text without the
chat template and adds no EOS, so an instruct model is trained on prompts it never sees at
inference. Over `sequence_len`, the completion is cut first; a prompt too long on its own keeps
its last `sequence_len - 1` tokens (its generation header stays next to the completion) and one
completion token.
"""

from __future__ import annotations

from typing import Any

from ebft_engine.config import EbftConfig
from ebft_engine.transforms import get_field, require_tokenizer

TRANSFORMS = ("transform",)


def build_row(prompt_ids: list[int], completion_ids: list[int], max_len: int) -> dict:
    """Concatenate, truncate to `max_len` as described above, and label the completion."""
    if len(prompt_ids) + len(completion_ids) > max_len:
        if len(prompt_ids) < max_len:
            completion_ids = completion_ids[: max_len - len(prompt_ids)]
        else:
            prompt_ids, completion_ids = prompt_ids[len(prompt_ids) - (max_len - 1):], completion_ids[:1]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [-100] * len(prompt_ids) + completion_ids,
        "prompt_length": len(prompt_ids),
    }


def transform(cfg: EbftConfig, **kwargs: Any):
    from ebft_engine.data import chat_template_kwargs, encode_text, render_prompt_ids

    max_len = cfg.sequence_len
    template_kwargs = chat_template_kwargs(cfg)

    def transform_fn(example: dict, tokenizer: Any = None) -> dict:
        require_tokenizer(tokenizer, "ebft_strided_structured.transform")
        prompt = get_field(example, "input", "prompt", "question")
        completion = get_field(example, "output", "completion", "answer")
        prompt_ids = render_prompt_ids(tokenizer, prompt, template_kwargs)
        completion_ids = encode_text(tokenizer, completion)
        if tokenizer.eos_token_id is not None:
            completion_ids.append(tokenizer.eos_token_id)
        return build_row(prompt_ids, completion_ids, max_len)

    return transform_fn, {"remove_columns": "__all__"}
