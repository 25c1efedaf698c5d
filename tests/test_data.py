"""Dataset loading: local files and folders, split slicing, transforms applied to whole
datasets, clear errors, the offline HumanEval, eval hold-outs and prompt rendering."""

from __future__ import annotations

import json
import textwrap
import pytest

from ebft_engine.builtin_data import humaneval_rows
from ebft_engine.config import ConfigError, DatasetConfig, EbftConfig, load_config
from ebft_engine.data import (
    DatasetError,
    chat_template_kwargs,
    load_dataset_rows,
    load_eval_data,
    load_source,
    load_training_data,
    parse_split,
    render_chat,
    render_prompt_ids,
)

PAIRS = [{"input": f"question {i}", "output": f"answer {i}", "id": i} for i in range(10)]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from ebft_engine.modeling import smollm2_folder

    return AutoTokenizer.from_pretrained(smollm2_folder("float32"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(**kw) -> EbftConfig:
    """A real config (the engine reads typed attributes only); `kw` are top-level keys."""
    return load_config({"base_model": "builtin:smollm2-135m-instruct", "rl": "ebft",
                        "ebft": {"mode": "strided"}, "datasets": [{"path": "unused.jsonl"}],
                        "sequence_len": 256, "seed": 7, **kw})


def entry(**kw) -> DatasetConfig:
    """One `datasets:` entry, typed as the config holds it."""
    return DatasetConfig(**kw)


def ids(ds):
    return [r["id"] for r in ds]


# --- splits ----------------------------------------------------------------------------------------


def test_parse_split():
    assert parse_split("train") == ("train", None, None)
    assert parse_split("train[:500]") == ("train", None, "500")
    assert parse_split("train[:1%]") == ("train", None, "1%")
    assert parse_split("test[10:20]") == ("test", "10", "20")
    assert parse_split("train[-3:]") == ("train", "-3", None)
    with pytest.raises(DatasetError, match="expected NAME"):
        parse_split("train[1:2:3]")


@pytest.mark.parametrize(
    "split, expected",
    [("train", list(range(10))), ("train[:2]", [0, 1]), ("train[:50%]", [0, 1, 2, 3, 4]),
     ("train[3:5]", [3, 4]), ("train[-2:]", [8, 9]), ("train[20%:40%]", [2, 3]), ("train[:100]", list(range(10)))],
)
def test_local_jsonl_with_slices(tmp_path, split, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert ids(load_source(entry(path=str(path), split=split))) == expected


def test_local_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pairs.json").write_text(json.dumps(PAIRS))
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "pairs.parquet")
    assert ids(load_source(entry(path=str(tmp_path / "pairs.json"), split="train[:2]"))) == [0, 1]
    assert ids(load_source(entry(path=str(tmp_path / "pairs.parquet"), split="train[:50%]"))) == [0, 1, 2, 3, 4]


def test_local_folder_of_parts_is_one_split(tmp_path):
    write_jsonl(tmp_path / "part-a.jsonl", PAIRS[:4])
    write_jsonl(tmp_path / "part-b.jsonl", PAIRS[4:])
    assert sorted(ids(load_source(entry(path=str(tmp_path))))) == list(range(10))
    assert len(load_source(entry(path=str(tmp_path), split="train[:50%]"))) == 5


def test_local_folder_with_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS[:8])
    write_jsonl(tmp_path / "test.jsonl", PAIRS[8:])
    assert ids(load_source(entry(path=str(tmp_path), split="train[:2]"))) == [0, 1]
    assert ids(load_source(entry(path=str(tmp_path), split="test"))) == [8, 9]
    assert ids(load_source(entry(path=str(tmp_path), data_files=["test.jsonl"], split="train[:1]"))) == [8]
    with pytest.raises(DatasetError, match=r"no split 'validation' \(its files hold test, train\)"):
        load_source(entry(path=str(tmp_path), split="validation"))


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "saved"))
    assert ids(load_source(entry(path=str(tmp_path / "saved"), split="train[-1:]"))) == [9]


def test_missing_sources_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_source(entry(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DatasetError, match="holds no"):
        load_source(entry(path=str(tmp_path)))


def test_hub_dataset_offline_names_it():
    with pytest.raises(DatasetError, match=r"dataset 'nobody-xyz/no-such-dataset' \(split 'train\[:5\]'\).*local"):
        load_source(entry(path="nobody-xyz/no-such-dataset", split="train[:5]"))


# --- transforms over datasets ----------------------------------------------------------------------


def test_transform_removes_all_original_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    ds = load_dataset_rows(entry(path=str(path), split="train[:3]", type="ebft_opencode.transform"),
                           tokenizer=tok, cfg=cfg())
    assert ds.column_names == ["prompt", "ground_truth"]
    assert ds[2] == {"prompt": [{"role": "user", "content": "question 2"}], "ground_truth": "answer 2"}


def test_custom_transform_module_and_kept_columns(tmp_path, monkeypatch, tok):
    (tmp_path / "qa_custom.py").write_text(textwrap.dedent("""
        def transform(cfg, **kwargs):
            def transform_fn(example, tokenizer=None):
                return {"prompt": [{"role": "user", "content": example["q"]}], "ground_truth": example["a"]}
            return transform_fn, {"remove_columns": "__all__"}

        def keep(cfg, **kwargs):
            def transform_fn(example, tokenizer=None):
                return {"n_tokens": len(tokenizer(example["q"])["input_ids"])}
            return transform_fn, {"remove_columns": ["a"]}
    """))
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "what?", "a": "that", "src": "x"}, {"q": "why?", "a": "so", "src": "y"}])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = load_dataset_rows(entry(path="qa.jsonl", type="qa_custom.transform"), tokenizer=tok, cfg=cfg())
    assert ds.column_names == ["prompt", "ground_truth"] and ds[1]["ground_truth"] == "so"
    ds = load_dataset_rows(entry(path="qa.jsonl", type="qa_custom.keep"), tokenizer=tok, cfg=cfg())
    assert sorted(ds.column_names) == ["n_tokens", "q", "src"] and ds[0]["n_tokens"] > 0


def test_axolotl_style_batched_transform(tmp_path, monkeypatch, tok):
    (tmp_path / "qa_batched.py").write_text(textwrap.dedent("""
        def transform(cfg, **kwargs):
            def transform_fn(examples, tokenizer=None):
                prompts, answers = [], []
                for q, a in zip(examples["q"], examples["a"]):
                    for part in a.split("|"):
                        prompts.append([{"role": "user", "content": q}])
                        answers.append(part)
                return {"prompt": prompts, "ground_truth": answers}
            return transform_fn, {"remove_columns": "__all__", "batched": True}
    """))
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "one", "a": "x"}, {"q": "two", "a": "y|z"}])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = load_dataset_rows(entry(path="qa.jsonl", type="qa_batched.transform"), tokenizer=tok, cfg=cfg())
    assert ds["ground_truth"] == ["x", "y", "z"] and ds.column_names == ["prompt", "ground_truth"]


def test_a_bad_row_names_dataset_row_and_field(tmp_path, tok):
    rows = PAIRS[:3] + [{"input": "no output here", "id": 3}] + PAIRS[4:6]
    path = write_jsonl(tmp_path / "bad.jsonl", [{**r, "output": r.get("output")} for r in rows])
    with pytest.raises(DatasetError) as info:
        load_dataset_rows(entry(path=str(path), type="ebft_opencode.transform"), tokenizer=tok, cfg=cfg())
    message = str(info.value)
    assert str(path) in message and "row 3" in message and "missing field 'output'" in message


def test_an_unknown_transform_names_the_dataset(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(DatasetError, match=rf"dataset {path}: dataset type 'nope_xyz.transform': no module"):
        load_dataset_rows(entry(path=str(path), type="nope_xyz.transform"), tokenizer=tok, cfg=cfg())


def test_all_turns_explodes_into_one_row_per_turn_and_mixed_remaining_turns_load(tmp_path, tok):
    convs = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "B"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "C"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", convs)
    ds = load_dataset_rows(entry(path=str(path), type="ebft_chat_multiturn.transform_all_turns"),
                           tokenizer=tok, cfg=cfg())
    assert ds["ground_truth"] == ["A", "B", "C"]
    assert [len(p) for p in ds["prompt"]] == [1, 1, 3]
    # the first row's remaining_turns is [] and the second's holds messages: one column type
    ds = load_dataset_rows(entry(path=str(path), type="ebft_chat_multiturn.transform"), tokenizer=tok, cfg=cfg())
    assert ds["remaining_turns"] == [[], convs[1]["messages"][2:]]


def test_strided_transform_over_humaneval(tok):
    ds = load_dataset_rows(entry(path="builtin:humaneval", split="train[:4]",
                                 type="ebft_strided_structured.transform"), tokenizer=tok, cfg=cfg(sequence_len=384))
    assert len(ds) == 4 and ds.column_names == ["input_ids", "labels", "prompt_length"]
    for row in ds:
        p = row["prompt_length"]
        assert len(row["input_ids"]) <= 384 and row["labels"][:p] == [-100] * p
        assert row["labels"][p:] == row["input_ids"][p:]


# --- HumanEval ---------------------------------------------------------------------------------------


def test_humaneval_splits_are_fixed_and_disjoint():
    train, test = humaneval_rows("train"), humaneval_rows("test")
    assert (len(train), len(test)) == (144, 20)
    assert train[0]["task_id"] == "HumanEval/0" and test[0]["task_id"] == "HumanEval/144"
    assert test[-1]["task_id"] == "HumanEval/163"
    assert not {r["task_id"] for r in train} & {r["task_id"] for r in test}
    row = train[0]
    assert set(row) == {"input", "output", "task_id", "prompt", "entry_point", "test"}
    assert row["input"] == row["prompt"] and row["entry_point"] == "has_close_elements"
    assert "def check(candidate)" in row["test"]


def test_humaneval_through_load_source_with_slicing():
    assert len(load_source(entry(path="builtin:humaneval"))) == 144
    ds = load_source(entry(path="builtin:humaneval", split="test[:5]"))
    assert ds["task_id"] == [f"HumanEval/{i}" for i in range(144, 149)]
    with pytest.raises(DatasetError, match="splits train"):
        load_source(entry(path="builtin:humaneval", split="validation"))
    with pytest.raises(DatasetError, match="unknown built-in dataset"):
        load_source(entry(path="builtin:mbpp"))


# --- training and eval data ------------------------------------------------------------------------


def test_training_data_concatenates_entries(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", PAIRS[:3])
    b = write_jsonl(tmp_path / "b.jsonl", PAIRS[3:])
    c = cfg(datasets=[{"path": str(a), "type": "ebft_opencode.transform"},
                      {"path": str(b), "split": "train[:2]", "type": "ebft_opencode.transform"}])
    ds = load_training_data(c, tok)
    assert ds["ground_truth"] == ["answer 0", "answer 1", "answer 2", "answer 3", "answer 4"]
    assert load_eval_data(c, tok) is None


def test_val_set_size_holds_out_rows_deterministically(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    c = cfg(datasets=[{"path": str(path), "type": "ebft_opencode.transform"}], val_set_size=0.2)
    train, held = load_training_data(c, tok), load_eval_data(c, tok)
    assert (len(train), len(held)) == (8, 2)
    assert set(train["ground_truth"]) | set(held["ground_truth"]) == {r["output"] for r in PAIRS}
    assert not set(train["ground_truth"]) & set(held["ground_truth"])
    assert load_training_data(c, tok)["ground_truth"] == train["ground_truth"]
    c.val_set_size = 3
    assert len(load_eval_data(c, tok)) == 3
    c.val_set_size = 10
    with pytest.raises(DatasetError, match="leaves no training rows"):
        load_training_data(c, tok)


def test_test_datasets_are_the_eval_data(tok):
    c = cfg(datasets=[{"path": "builtin:humaneval", "type": "ebft_opencode.transform"}],
            test_datasets=[{"path": "builtin:humaneval", "split": "test", "type": "ebft_opencode.transform"}])
    c.val_set_size = 0.1  # load_config refuses both; the loaders still prefer test_datasets
    assert len(load_training_data(c, tok)) == 144  # test_datasets win over val_set_size
    assert len(load_eval_data(c, tok)) == 20


def test_no_datasets_is_an_error(tok):
    with pytest.raises(DatasetError, match="no `datasets`"):
        load_training_data(EbftConfig(datasets=[]), tok)  # load_config refuses it earlier


# --- prompts ---------------------------------------------------------------------------------------


def test_render_prompt_ids_wraps_a_string_as_one_user_message(tok):
    as_text = render_prompt_ids(tok, "What is 2+2?")
    as_messages = render_prompt_ids(tok, [{"role": "user", "content": "What is 2+2?"}])
    assert as_text == as_messages
    assert tok.decode(as_text).endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_render_prompt_ids_passes_chat_template_kwargs(tok):
    from copy import deepcopy

    t = deepcopy(tok)
    t.chat_template = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'THINK' if enable_thinking else 'NOTHINK' }}{% endif %}")
    assert t.decode(render_prompt_ids(t, "q", {"enable_thinking": False})) == "q\nNOTHINK"
    assert t.decode(render_prompt_ids(t, "q", {"enable_thinking": True})) == "q\nTHINK"
    assert render_chat(t, [{"role": "user", "content": "q"}], add_generation_prompt=False) == "q\n"


def test_chat_template_kwargs_come_from_trl():
    assert chat_template_kwargs(cfg(trl={"chat_template_kwargs": {"enable_thinking": False}})) == {
        "enable_thinking": False}
    assert chat_template_kwargs(cfg(trl={"chat_template_kwargs": None})) == {}
    # axolotl's top-level spelling means the same (issue 18); both, set apart, are refused
    assert chat_template_kwargs(cfg(chat_template_kwargs={"x": 1})) == {"x": 1}
    with pytest.raises(ConfigError, match="`chat_template_kwargs` means `trl.chat_template_kwargs"):
        cfg(chat_template_kwargs={"x": 1}, trl={"chat_template_kwargs": {"x": 2}})


def test_a_tokenizer_without_chat_template_reads_plain_text(tok):
    from copy import deepcopy

    t = deepcopy(tok)
    t.chat_template = None
    assert render_prompt_ids(t, "hello there") == list(t("hello there")["input_ids"])
    with pytest.raises(DatasetError, match="no chat template"):
        render_prompt_ids(t, [{"role": "user", "content": "hi"}])


def test_split_parts_concatenate(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", PAIRS[:8])
    write_jsonl(tmp_path / "test.jsonl", PAIRS[8:])
    assert ids(load_source(entry(path=str(tmp_path), split="train[:2]+test[-1:]"))) == [0, 1, 9]
    assert len(load_source(entry(path="builtin:humaneval", split="train[:3]+test[:2]"))) == 5


@pytest.mark.parametrize("preset, columns", [
    ("smollm2-135m-strided-cpu", ["input_ids", "labels", "prompt_length"]),
    ("smollm2-135m-structured-cpu", ["prompt", "ground_truth"]),
])
def test_presets_load_through_the_real_config(preset, columns, tok):
    from pathlib import Path

    from ebft_engine.config import load_config

    root = Path(__file__).resolve().parents[1]
    c = load_config(root / "presets" / f"{preset}.yaml", ["datasets.0.split=train[:3]"])
    train, held = load_training_data(c, tok), load_eval_data(c, tok)
    assert (len(train), len(held)) == (3, 20)
    assert train.column_names == columns and held.column_names == columns


# --- dataset_prepared_path: a cache of transformed rows ---------------------------------------------


def test_prepared_rows_are_reused_until_something_that_made_them_changes(tmp_path, monkeypatch, tok):
    import ebft_engine.data as data

    builds = []
    real = data._transform_all
    monkeypatch.setattr(data, "_transform_all", lambda *a: builds.append(1) or real(*a))
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    prepared = tmp_path / "prepared"

    def load(**kw):
        return load_training_data(cfg(datasets=[{"path": str(path), "type": "ebft_opencode.transform"}],
                                      dataset_prepared_path=str(prepared), **kw), tok)

    first = load()
    assert len(builds) == 1 and len([p for p in prepared.iterdir() if not p.name.startswith(".")]) == 1
    again = load(learning_rate=1e-3, max_steps=7, val_set_size=2)  # nothing that makes rows: the cache
    assert len(builds) == 1 and len(again) == 8
    assert load()["ground_truth"] == first["ground_truth"] and len(builds) == 1
    load(sequence_len=128)  # the transform reads it: rebuilt
    assert len(builds) == 2
    write_jsonl(path, [dict(r, output=r["output"] + "!") for r in PAIRS])  # the data file changed
    assert load()["ground_truth"][0] == "answer 0!" and len(builds) == 3
    assert not [p for p in prepared.iterdir() if p.name.startswith(".tmp-")]
