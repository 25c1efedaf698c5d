"""The spec's built-in dataset transforms and custom-transform loading, on the real SmolLM2
tokenizer (ChatML template, eos `<|im_end|>`)."""

from __future__ import annotations

import sys
import textwrap
import pytest

from ebft_engine.config import EbftConfig, load_config
from ebft_engine.data import encode_text, render_chat, render_prompt_ids
from ebft_engine.transforms import TransformError, builtin_names, load_transform

CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, since 3+3=6."},
    ]
}
PAIR = {"input": "Write a function to add two numbers.", "output": "def add(a, b):\n    return a + b"}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from ebft_engine.modeling import smollm2_folder

    return AutoTokenizer.from_pretrained(smollm2_folder("float32"))


def cfg(**kw) -> EbftConfig:
    """A real config (transforms get the run's EbftConfig); `kw` are top-level keys."""
    return load_config({"base_model": "builtin:smollm2-135m-instruct", "rl": "ebft",
                        "ebft": {"mode": "strided", "context_length": 1, "generate_max_len": 1},
                        "datasets": [{"path": "unused.jsonl"}], "sequence_len": 512, **kw})


def fn_of(type_name, **kw):
    fn, options = load_transform(type_name, cfg(**kw))
    return fn, options


def test_the_spec_table_is_built_in():
    names = set(builtin_names())
    assert {
        "ebft_opencode.transform",
        "ebft_strided_structured.transform",
        "ebft_strided_chat.transform",
        "ebft_chat_multiturn.transform",
        "ebft_chat_multiturn.transform_last_turn",
        "ebft_chat_multiturn.transform_all_turns",
        "ebft_reasoning.transform",
    } <= names
    for name in names:
        _, options = fn_of(name)
        assert options["remove_columns"] == "__all__"


def test_opencode():
    fn, _ = fn_of("ebft_opencode.transform")
    assert fn(PAIR) == {"prompt": [{"role": "user", "content": PAIR["input"]}], "ground_truth": PAIR["output"]}


def test_strided_structured_labels_only_the_completion(tok):
    fn, _ = fn_of("ebft_strided_structured.transform")
    row = fn(PAIR, tokenizer=tok)
    assert set(row) == {"input_ids", "labels", "prompt_length"}
    prompt_ids = render_prompt_ids(tok, PAIR["input"])
    completion_ids = encode_text(tok, PAIR["output"]) + [tok.eos_token_id]
    p = row["prompt_length"]
    assert p == len(prompt_ids)
    assert row["input_ids"] == prompt_ids + completion_ids
    assert row["labels"][:p] == [-100] * p
    assert row["labels"][p:] == row["input_ids"][p:]
    assert tok.decode(row["input_ids"][p:]) == PAIR["output"] + "<|im_end|>"
    assert tok.decode(prompt_ids).endswith("<|im_start|>user\n" + PAIR["input"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_strided_structured_truncates_completion_then_prompt(tok):
    full = fn_of("ebft_strided_structured.transform")[0](PAIR, tokenizer=tok)
    p = full["prompt_length"]
    row = fn_of("ebft_strided_structured.transform", sequence_len=p + 3)[0](PAIR, tokenizer=tok)
    assert row["input_ids"] == full["input_ids"][: p + 3] and row["prompt_length"] == p
    assert row["labels"] == [-100] * p + full["input_ids"][p : p + 3]
    # prompt longer than the budget: its last sequence_len-1 tokens and one completion token
    row = fn_of("ebft_strided_structured.transform", sequence_len=10)[0](PAIR, tokenizer=tok)
    assert row["input_ids"] == full["input_ids"][p - 9 : p + 1]
    assert row["prompt_length"] == 9 and row["labels"] == [-100] * 9 + [full["input_ids"][p]]


def test_strided_structured_needs_a_tokenizer(tok):
    with pytest.raises(TransformError, match="tokenizer"):
        fn_of("ebft_strided_structured.transform")[0](PAIR)


def _labelled_spans(ids, labels):
    spans, current = [], []
    for i, label in zip(ids, labels):
        if label == -100:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    return spans + ([current] if current else [])


def test_strided_chat_labels_exactly_the_assistant_turns(tok):
    fn, _ = fn_of("ebft_strided_chat.transform")
    row = fn(CHAT, tokenizer=tok)
    assert set(row) == {"input_ids", "labels", "prompt_length"}
    # same ids as tokenizing the whole rendered conversation at once (ChatML splits at specials)
    assert row["input_ids"] == encode_text(tok, render_chat(tok, CHAT["messages"], add_generation_prompt=False))
    spans = [tok.decode(s) for s in _labelled_spans(row["input_ids"], row["labels"])]
    assert spans == ["4<|im_end|>\n", "6, since 3+3=6.<|im_end|>\n"]
    assert row["prompt_length"] == len(render_prompt_ids(tok, CHAT["messages"][:2]))
    assert all(label == -100 for label in row["labels"][: row["prompt_length"]])
    assert row["labels"][row["prompt_length"]] != -100


def test_strided_chat_truncates(tok):
    full = fn_of("ebft_strided_chat.transform")[0](CHAT, tokenizer=tok)
    row = fn_of("ebft_strided_chat.transform", sequence_len=full["prompt_length"] + 2)[0](CHAT, tokenizer=tok)
    n = full["prompt_length"] + 2
    assert row == {"input_ids": full["input_ids"][:n], "labels": full["labels"][:n], "prompt_length": full["prompt_length"]}


def test_strided_chat_with_a_template_that_rewrites_history(tok):
    """A template whose earlier turns render differently once more turns follow (like templates
    that drop past reasoning) takes the whole-text path; labels still cover each answer."""
    from copy import deepcopy

    t = deepcopy(tok)
    t.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'] | replace('6', 'six') }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    msgs = CHAT["messages"][:3] + [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "6"},
                                   {"role": "user", "content": "ok"}]
    row = fn_of("ebft_strided_chat.transform")[0]({"messages": msgs}, tokenizer=t)
    assert row["input_ids"] == encode_text(t, render_chat(t, msgs, add_generation_prompt=False))
    spans = [t.decode(s) for s in _labelled_spans(row["input_ids"], row["labels"])]
    assert spans == ["4<|im_end|>\n", "six<|im_end|>\n"]


def test_chat_multiturn_first_turn_with_remaining_turns():
    fn, _ = fn_of("ebft_chat_multiturn.transform")
    m = CHAT["messages"]
    assert fn(CHAT) == {"prompt": m[:2], "ground_truth": "4", "remaining_turns": m[3:]}
    single = {"messages": m[:3]}
    assert fn(single)["remaining_turns"] == []


def test_chat_multiturn_last_turn():
    fn, _ = fn_of("ebft_chat_multiturn.transform_last_turn")
    m = CHAT["messages"]
    assert fn(CHAT) == {"prompt": m[:4], "ground_truth": "6, since 3+3=6."}


def test_chat_multiturn_all_turns_lists_one_per_assistant_turn():
    fn, options = fn_of("ebft_chat_multiturn.transform_all_turns")
    m = CHAT["messages"]
    assert fn(CHAT) == {"prompt": [m[:2], m[:4]], "ground_truth": ["4", "6, since 3+3=6."]}
    assert options["explode"] is True


def test_sharegpt_conversations_are_read():
    fn, _ = fn_of("ebft_chat_multiturn.transform_last_turn")
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert fn(row) == {"prompt": [{"role": "user", "content": "hi"}], "ground_truth": "hello"}


def test_conversation_without_assistant_is_an_error():
    for name in ("ebft_chat_multiturn.transform", "ebft_reasoning.transform"):
        with pytest.raises(ValueError, match="no assistant message"):
            fn_of(name)[0]({"messages": [{"role": "user", "content": "hi"}]})


def test_reasoning_keeps_the_thinking_in_the_ground_truth():
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>\n2 and 2 make 4.\n</think>\n\n4"}]}
    assert fn_of("ebft_reasoning.transform")[0](row) == {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "ground_truth": "<think>\n2 and 2 make 4.\n</think>\n\n4",
    }
    assert fn_of("ebft_reasoning.transform_answer_only")[0](row)["ground_truth"] == "4"


def test_pretrain_chunks_documents(tok):
    fn, options = fn_of("ebft_pretrain.transform", sequence_len=8)
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
    out = fn({"text": text}, tokenizer=tok)
    ids = list(tok(text)["input_ids"])
    assert sum(out["input_ids"], []) == ids and all(len(c) <= 8 for c in out["input_ids"])
    assert out["labels"] == out["input_ids"] and set(out["prompt_length"]) == {0}
    assert options["explode"] is True


# --- custom transforms -----------------------------------------------------------------------------


def test_custom_transform_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_qa.py").write_text(textwrap.dedent("""
        def transform(cfg, **kwargs):
            def transform_fn(example, tokenizer=None):
                return {"prompt": [{"role": "user", "content": example["question"]}],
                        "ground_truth": example["answer"]}
            return transform_fn, {"remove_columns": "__all__"}
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # restored after
    fn, options = load_transform("my_qa.transform", cfg())
    assert fn({"question": "q", "answer": "a"}) == {"prompt": [{"role": "user", "content": "q"}], "ground_truth": "a"}
    assert options == {"remove_columns": "__all__"}


@pytest.mark.parametrize(
    "source, type_name, message",
    [
        (None, "no_such_module_xyz.transform", "no module 'no_such_module_xyz' in the current directory"),
        ("def other(cfg):\n    pass\n", "{mod}.transform", "has no function 'transform' (it has: other)"),
        ("def transform(cfg, **kw):\n    return lambda ex, tokenizer=None: ex\n", "{mod}.transform",
         "must return (transform_fn"),
        ("import not_installed_dep_xyz\n", "{mod}.transform", "importing '{mod}' failed"),
        (None, "transform", "expected `module.function`"),
        (None, "ebft_opencode.nope", "module 'ebft_opencode' has no function 'nope'"),
    ],
)
def test_broken_custom_transforms_say_what_is_wrong(tmp_path, monkeypatch, source, type_name, message):
    mod = f"broken_{abs(hash((source, type_name))) % 10**8}"
    if source is not None:
        (tmp_path / f"{mod}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TransformError) as info:
        load_transform(type_name.format(mod=mod), cfg())
    assert message.format(mod=mod) in str(info.value)
