"""Dataset loading: `datasets:` entries -> transformed rows, split slicing, eval hold-out, and
prompt rendering through the chat template.

A `datasets:` entry names a source (`builtin:humaneval`, a local JSON/JSONL/Parquet file or a
folder of them, a `save_to_disk` folder, or a hub id), a `split` with optional slicing
(`train[:500]`, `train[:1%]`, `train[10:20]`), and a `type` (a built-in or custom transform,
see `ebft_engine.transforms`). Every error names the dataset path, and a bad row also its index.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ebft_engine import sources

if TYPE_CHECKING:  # `datasets` is imported where used: `validate` must stay fast
    import datasets
    from transformers import PreTrainedTokenizerBase

    from ebft_engine.config import DatasetConfig, EbftConfig

IGNORE_INDEX = -100
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DatasetError(ValueError):
    """A dataset that cannot be loaded or transformed; the message names it (and the row)."""


# --- prompt rendering ----------------------------------------------------------------------------


def chat_template_kwargs(cfg: EbftConfig) -> dict:
    """`trl.chat_template_kwargs` (the spec's place, e.g. `enable_thinking: false`). Training data,
    generation and features must all render prompts with the same kwargs."""
    return dict(cfg.trl.chat_template_kwargs)


def encode_text(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[int]:
    """Token ids of `text` as it stands (no BOS/EOS added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_chat(
    tokenizer: "PreTrainedTokenizerBase",
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    chat_template_kwargs: dict | None = None,
) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
    )


def render_prompt_ids(
    tokenizer: "PreTrainedTokenizerBase",
    prompt: str | list[dict],
    chat_template_kwargs: dict | None = None,
) -> list[int]:
    """Token ids of a prompt as the model sees it before answering: the chat template with the
    generation prompt. A string is one user message. A tokenizer without a chat template (a base
    model) gets a string prompt as plain text with its special tokens (e.g. BOS)."""
    if getattr(tokenizer, "chat_template", None) is None:
        if isinstance(prompt, str):
            return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        raise DatasetError(
            "the tokenizer has no chat template, so chat-message prompts cannot be rendered: set "
            "`chat_template` in the config (e.g. chatml) or use a model with one"
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = render_chat(tokenizer, messages, add_generation_prompt=True, chat_template_kwargs=chat_template_kwargs)
    return encode_text(tokenizer, text)


# --- split slicing ---------------------------------------------------------------------------------

_SPLIT = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """`train[10:20]` -> ("train", "10", "20"); bounds may be counts or percentages."""
    match = _SPLIT.match(split or "train")
    if not match:
        raise DatasetError(f"split {split!r}: expected NAME or NAME[start:stop], e.g. train[:500], train[:1%]")
    return match.group(1), match.group(2), match.group(3)


def _bound(value: str | None, n: int) -> int | None:
    if value is None:
        return None
    if value.endswith("%"):
        return int(round(n * int(value[:-1]) / 100))  # datasets' "closest" rounding
    return int(value)


def slice_rows(ds: "datasets.Dataset", start: str | None, stop: str | None) -> "datasets.Dataset":
    """Rows [start:stop] with Python slice semantics; percentages are of the whole split."""
    if start is None and stop is None:
        return ds
    indices = range(len(ds))[slice(_bound(start, len(ds)), _bound(stop, len(ds)))]
    return ds.select(indices)


# --- sources ---------------------------------------------------------------------------------------


def _load_local(path: Path, split_name: str, spec: DatasetConfig) -> "datasets.Dataset":
    import datasets

    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split_name not in loaded:
                raise DatasetError(f"dataset {path}: no split {split_name!r} (it has {', '.join(loaded)})")
            return loaded[split_name]
        return loaded
    if path.is_dir() and spec.data_files:
        data_files = spec.data_files
        files = [path / f for f in ([data_files] if isinstance(data_files, str) else data_files)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_FORMATS)
        if not files:
            raise DatasetError(f"dataset {path}: the folder holds no {'/'.join(LOCAL_FORMATS)} files")
        files = _files_of_split(path, files, split_name)
    else:
        files = [path]
    kinds = {LOCAL_FORMATS.get(f.suffix) for f in files}
    ds_type = spec.ds_type
    builder = ("json" if ds_type == "jsonl" else ds_type) or (kinds.pop() if len(kinds) == 1 else None)
    if builder is None:
        raise DatasetError(f"dataset {path}: mixed or unknown file types; set ds_type (json, parquet, csv)")
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")


SPLIT_NAMES = {"train", "test", "validation", "valid", "dev", "eval"}


def _files_of_split(folder: Path, files: list[Path], split_name: str) -> list[Path]:
    """Files named for splits (train.jsonl, test-00000-of-00001.parquet) hold those splits;
    otherwise every file of the folder is one split, whatever it is called."""
    split_of = {f: re.split(r"[-._]", f.name, maxsplit=1)[0] for f in files}
    if not set(split_of.values()) <= SPLIT_NAMES:
        return files
    chosen = [f for f, name in split_of.items() if name == split_name]
    if not chosen:
        raise DatasetError(
            f"dataset {folder}: no split {split_name!r} (its files hold {', '.join(sorted(set(split_of.values())))})"
        )
    return chosen


def load_source(spec: DatasetConfig) -> "datasets.Dataset":
    """The raw rows of one `datasets:` entry, split and slice applied, before any transform.
    `train[:10]+test[:5]` concatenates slices, as `datasets` does for hub ids."""
    path = spec.path
    if not path:
        raise DatasetError("a datasets entry has no `path`")
    split = spec.split
    is_local = Path(path).expanduser().exists()
    if not (sources.is_builtin(path) or is_local):
        if sources.is_local(path, tuple(LOCAL_FORMATS)):
            raise DatasetError(f"dataset {path}: no such file or folder")
        return _load_hub(path, split, spec)
    parts = []
    for part in split.split("+"):
        split_name, start, stop = parse_split(part)
        try:
            if is_local:
                ds = _load_local(Path(path).expanduser(), split_name, spec)
            else:
                from ebft_engine.builtin_data import load_builtin

                ds = load_builtin(path, split_name)
        except DatasetError:
            raise
        except Exception as error:  # datasets' own errors, re-raised with the entry's path
            raise DatasetError(f"dataset {path}: {type(error).__name__}: {error}") from error
        parts.append(slice_rows(ds, start, stop))
    if len(parts) == 1:
        return parts[0]
    import datasets

    return datasets.concatenate_datasets(parts)


def _load_hub(path: str, split: str, spec: DatasetConfig) -> "datasets.Dataset":
    import datasets

    kwargs = {k: v for k, v in (("name", spec.name), ("data_files", spec.data_files),
                                ("revision", spec.revision)) if v is not None}
    try:
        return datasets.load_dataset(path, split=split, **kwargs)
    except Exception as error:
        raise DatasetError(
            f"dataset {path!r} (split {split!r}) could not be loaded from the Hugging Face Hub "
            f"({type(error).__name__}: {error}). On a machine without hub access use a local "
            f"JSON/JSONL/Parquet file or folder, or `builtin:humaneval`."
        ) from error


# --- transforms ------------------------------------------------------------------------------------


def _row_error(path: str, type_name: str, index: int, row: dict, error: Exception) -> DatasetError:
    if isinstance(error, KeyError):
        what = f"missing field {error.args[0]!r} (the row has: {', '.join(row) or 'no fields'})"
    else:
        what = f"{type(error).__name__}: {error}"
    return DatasetError(f"dataset {path}, row {index}: transform {type_name} failed: {what}")


def _columns(rows: list[dict]) -> dict[str, list]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return {k: [row.get(k) for row in rows] for k in keys}


def apply_transform(
    ds: "datasets.Dataset", fn: Callable, options: dict, *, tokenizer: Any, path: str, type_name: str
) -> "datasets.Dataset":
    """`fn` over every row of `ds` with the transform's options (`remove_columns`, `batched`,
    `explode`: see `ebft_engine.transforms`); a failing row is named in the error.

    The result is built in one go rather than by `Dataset.map`'s batches: Arrow then infers each
    column's type from all rows at once, so a column that is `[]` in early rows
    (`remaining_turns`) and holds messages later still gets one type."""
    import datasets

    remove = options.get("remove_columns")
    removed = set(ds.column_names if remove == "__all__" else remove or [])
    if options.get("batched"):
        batch = ds.to_dict()
        try:
            out = dict(fn(batch, tokenizer=tokenizer))
        except Exception as error:
            raise DatasetError(f"dataset {path}: transform {type_name} (batched) failed: "
                               f"{type(error).__name__}: {error}") from error
        kept = {c: v for c, v in batch.items() if c not in removed and c not in out}
        if kept and any(len(v) != len(ds) for v in out.values()):
            raise DatasetError(f"dataset {path}: transform {type_name} changes the number of rows, "
                               f"so it must remove every original column (remove_columns: __all__)")
        return datasets.Dataset.from_dict({**kept, **out})

    outputs: list[dict] = []
    for index, row in enumerate(ds):
        try:
            out = fn(row, tokenizer=tokenizer)
        except Exception as error:
            raise _row_error(path, type_name, index, row, error) from error
        if not isinstance(out, dict):
            raise DatasetError(f"dataset {path}, row {index}: transform {type_name} returned "
                               f"{type(out).__name__}, not a dict")
        kept = {c: v for c, v in row.items() if c not in removed}
        if not options.get("explode"):
            outputs.append({**kept, **out})
            continue
        lengths = {len(v) for v in out.values()}
        if len(lengths) > 1:
            raise DatasetError(f"dataset {path}, row {index}: transform {type_name} (explode) "
                               f"returned lists of different lengths")
        outputs += [{**kept, **{k: v[i] for k, v in out.items()}} for i in range(lengths.pop() if lengths else 0)]
    return datasets.Dataset.from_dict(_columns(outputs))


def load_dataset_rows(spec: DatasetConfig, *, tokenizer: Any, cfg: EbftConfig) -> "datasets.Dataset":
    """One `datasets:` entry: load, slice, transform."""
    from ebft_engine.transforms import TransformError, load_transform

    ds = load_source(spec)
    path = spec.path
    type_name = spec.type
    if not type_name:  # rows already in the trainer's format (e.g. pre-tokenized)
        return ds
    try:
        fn, options = load_transform(str(type_name), cfg, ds_cfg=spec)
    except TransformError as error:
        raise DatasetError(f"dataset {path}: {error}") from error
    return apply_transform(ds, fn, options, tokenizer=tokenizer, path=path, type_name=str(type_name))


def _concat(cfg: EbftConfig, entries: list[DatasetConfig], tokenizer: Any) -> "datasets.Dataset":
    """Every entry transformed and concatenated; from `dataset_prepared_path` when it holds them."""
    if cfg.dataset_prepared_path:
        from ebft_engine.prepared import cached

        return cached(cfg, entries, tokenizer, lambda: _transform_all(cfg, entries, tokenizer))
    return _transform_all(cfg, entries, tokenizer)


def _transform_all(cfg: EbftConfig, entries: list[DatasetConfig], tokenizer: Any) -> "datasets.Dataset":
    import datasets

    parts = [load_dataset_rows(spec, tokenizer=tokenizer, cfg=cfg) for spec in entries]
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as error:
        names = ", ".join(f"{s.path} {sorted(p.column_names)}" for s, p in zip(entries, parts))
        raise DatasetError(f"the datasets cannot be combined, their columns differ: {names} ({error})") from error


def _holdout(cfg: EbftConfig, ds: "datasets.Dataset") -> tuple["datasets.Dataset", "datasets.Dataset | None"]:
    """`val_set_size` (a fraction < 1, or a row count) held out of the training rows, seeded."""
    size = cfg.val_set_size
    if not size or cfg.test_datasets:
        return ds, None
    test_size = float(size) if float(size) < 1 else int(size)
    if (test_size if isinstance(test_size, int) else round(test_size * len(ds))) >= len(ds):
        raise DatasetError(f"val_set_size {size} leaves no training rows out of {len(ds)}")
    parts = ds.train_test_split(test_size=test_size, seed=cfg.seed, shuffle=True)
    return parts["train"], parts["test"]


def load_training_data(cfg: EbftConfig, tokenizer: Any, split: str = "train") -> "datasets.Dataset":
    """All `cfg.datasets`, transformed and concatenated, less the `val_set_size` hold-out.
    `split="eval"` returns that hold-out instead (see `load_eval_data`)."""
    entries = list(cfg.datasets)
    if not entries:
        raise DatasetError("the config has no `datasets`")
    train, held_out = _holdout(cfg, _concat(cfg, entries, tokenizer))
    if split == "train":
        return train
    if split == "eval":
        if held_out is None:
            raise DatasetError("no eval rows: set val_set_size or test_datasets")
        return held_out
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")


def load_eval_data(cfg: EbftConfig, tokenizer: Any) -> "datasets.Dataset | None":
    """`cfg.test_datasets` when given, else the `val_set_size` hold-out, else None."""
    entries = list(cfg.test_datasets or [])
    if entries:
        return _concat(cfg, entries, tokenizer)
    if cfg.val_set_size:
        return load_training_data(cfg, tokenizer, split="eval")
    return None
