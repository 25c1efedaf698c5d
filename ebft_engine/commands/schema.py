"""`python -m ebft_engine schema`: the config schema as JSON, for the TUI's parameter editor.

Derived from the pydantic model in `ebft_engine/config.py`, so it never drifts from what `validate`
accepts. Output (a stable contract), one JSON document on stdout:

    {"version": 1,
     "fields": [
       {"key": "ebft.stride",          # dotted key, usable as a `key=value` override
        "section": "ebft",             # ebft | trl | vllm | model | data | lora | training |
                                       # performance | output | logging
        "type": "int",                 # int | float | bool | str | list | dict | enum
        "default": 8,                  # JSON value; null = unset
        "choices": null,               # for "enum": the accepted values (may mix true/false and strings)
        "description": "...",
        "min": 1, "max": null,         # numeric bounds (inclusive unless min_exclusive/max_exclusive)
        "min_exclusive": false, "max_exclusive": false,
        "nullable": false,             # true when an empty value (unset) is allowed
        "mode": "strided",             # strided | structured | null: the mode the key has an effect in
        "item_type": null,             # for "list": int | float | str | dict
        "item_fields": null},          # for `datasets` / `test_datasets`: the fields of one entry
       ...]}

Nested sections are flattened (`trl.generation_kwargs.stop_token_ids`,
`gradient_checkpointing_kwargs.use_reentrant`); `datasets` is one "list" field with `item_fields`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Annotated, Any, Literal, Union, get_args, get_origin

SCHEMA_VERSION = 1
_SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--indent", type=int, default=None, help="pretty-print with this indent")


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(json.dumps(schema(), indent=args.indent) + "\n")
    return 0


def schema() -> dict[str, Any]:
    from ebft_engine.config import EbftConfig

    return {"version": SCHEMA_VERSION, "fields": fields_of(EbftConfig)}


def fields_of(model: Any, prefix: str = "", section: str | None = None,
              mode: str | None = None) -> list[dict[str, Any]]:
    from pydantic import BaseModel

    from ebft_engine.config import _unwrap

    out: list[dict[str, Any]] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        sec = section or extra.get("section") or name
        ann, nullable = _unwrap(info.annotation)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(fields_of(ann, key + ".", sec, extra.get("mode") or mode))
            continue
        entry: dict[str, Any] = {
            "key": key, "section": sec, "type": "str", "default": _default(info), "choices": None,
            "description": info.description or "", "min": None, "max": None,
            "min_exclusive": False, "max_exclusive": False, "nullable": nullable,
            "mode": extra.get("mode") or mode, "item_type": None, "item_fields": None,
        }
        _fill_type(entry, ann)
        for m in info.metadata or []:
            for attr, bound, exclusive in (("ge", "min", False), ("gt", "min", True),
                                           ("le", "max", False), ("lt", "max", True)):
                value = getattr(m, attr, None)
                if value is not None:
                    entry[bound] = value
                    entry[f"{bound}_exclusive"] = exclusive
        out.append(entry)
    return out


def _fill_type(entry: dict[str, Any], ann: Any) -> None:
    from pydantic import BaseModel

    origin = get_origin(ann)
    if origin is Annotated:
        ann = get_args(ann)[0]
        origin = get_origin(ann)
    if origin is Literal:
        entry["type"], entry["choices"] = "enum", list(get_args(ann))
    elif origin is Union:
        from ebft_engine.config import _literal_choices

        members = get_args(ann)
        choices = _literal_choices(ann)
        if any(get_origin(m) is list for m in members):  # e.g. lora_target_modules: list or regex string
            entry["type"] = "list"
            item = next(get_args(m)[0] for m in members if get_origin(m) is list)
            entry["item_type"] = _SCALARS.get(item, "str")
        elif choices and all(get_origin(m) is Literal or m is bool for m in members):
            entry["type"], entry["choices"] = "enum", choices
        else:
            entry["type"] = _SCALARS.get(members[0], "str")
    elif origin is list:
        (item,) = get_args(ann)
        entry["type"] = "list"
        if get_origin(item) is Annotated:
            item = get_args(item)[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            entry["item_type"] = "dict"
            entry["item_fields"] = fields_of(item, "", entry["section"])
        else:
            entry["item_type"] = _SCALARS.get(item, "str")
    elif origin is dict or ann is dict:
        entry["type"] = "dict"
    else:
        entry["type"] = _SCALARS.get(ann, "str")


def _default(info: Any) -> Any:
    from pydantic import BaseModel

    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return value
