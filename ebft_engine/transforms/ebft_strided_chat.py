"""`{messages}` -> `{input_ids, labels, prompt_length}` for strided mode on chat data.

The conversation is rendered with the chat template; labels equal the ids on every assistant
turn (its content and end-of-turn tokens) and are -100 elsewhere (system, user, the assistant
headers). `prompt_length` = tokens before the first assistant content. Truncated to
`sequence_len`, not padded.

Each piece is tokenized on its own, cut where the template's rendering of the conversation so
far ends, so the ids of a turn's context are exactly those a model answering it would see. For a
template whose rendering of earlier turns changes as turns are added (e.g. one that drops past
reasoning), the whole text is tokenized at once and turns are located by the token counts of
their rendered prefixes, as axolotl does.
"""

from __future__ import annotations

from typing import Any

from ebft_engine.config import EbftConfig
from ebft_engine.transforms import get_messages, require_tokenizer

TRANSFORMS = ("transform",)


def tokenize_chat(tokenizer: Any, messages: list[dict], template_kwargs: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation, labels only on assistant turns."""
    from ebft_engine.data import encode_text, render_chat

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return render_chat(tokenizer, msgs, add_generation_prompt=generation_prompt, chat_template_kwargs=template_kwargs)

    full = render(messages, False)
    # (text before the turn's content, text up to the end of the turn) per assistant turn
    turns = [(render(messages[:i], True), render(messages[: i + 1], False))
             for i, msg in enumerate(messages) if msg["role"] == "assistant"]

    pieces: list[tuple[str, bool]] = []  # (text, trainable)
    done = ""
    for before, after in turns:
        if not (before.startswith(done) and after.startswith(before)):
            break
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    else:
        if full.startswith(done):
            ids: list[int] = []
            labels: list[int] = []
            for text, trainable in pieces + [(full[len(done):], False)]:
                piece = encode_text(tokenizer, text)
                ids += piece
                labels += piece if trainable else [-100] * len(piece)
            return ids, labels

    ids = encode_text(tokenizer, full)
    labels = [-100] * len(ids)
    for before, after in turns:
        start, end = len(encode_text(tokenizer, before)), len(encode_text(tokenizer, after))
        labels[start:end] = ids[start:end]
    return ids, labels


def transform(cfg: EbftConfig, **kwargs: Any):
    from ebft_engine.data import chat_template_kwargs

    max_len = cfg.sequence_len
    template_kwargs = chat_template_kwargs(cfg)

    def transform_fn(example: dict, tokenizer: Any = None) -> dict:
        require_tokenizer(tokenizer, "ebft_strided_chat.transform")
        messages = get_messages(example)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant message")
        ids, labels = tokenize_chat(tokenizer, messages, template_kwargs)
        ids, labels = ids[:max_len], labels[:max_len]
        prompt_length = next((i for i, label in enumerate(labels) if label != -100), len(ids))
        return {"input_ids": ids, "labels": labels, "prompt_length": prompt_length}

    return transform_fn, {"remove_columns": "__all__"}
