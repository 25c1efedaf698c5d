"""`key=value` overrides: the dotlist the CLI and the TUI pass on to the engine.

`lr=1e-5` parses the value with `yaml.safe_load` (so it becomes a float), dotted keys address
nested mappings (`ebft.stride=16`), and an empty value (`wandb_run_id=`) means null. The engine
does the real validation; this module only splits, parses and merges.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_0-9][A-Za-z0-9_\-]*)*$")


class OverrideError(ValueError):
    """A `key=value` item that cannot be parsed; `.item` is the offending text."""

    def __init__(self, item: str, message: str):
        super().__init__(f"{item!r}: {message}")
        self.item = item
        self.message = message


def is_override(item: str) -> bool:
    """True for `key=value` / `a.b=value` items (not for `--flags`)."""
    key, sep, _ = item.partition("=")
    return bool(sep) and bool(_KEY.match(key))


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def parse_value(text: str) -> Any:
    """YAML-typed value; also `1e-5` (YAML 1.1 wants `1.0e-5`) is a float; empty means null."""
    if text == "":
        return None
    if _NUMBER.match(text.strip()):
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    if not sep:
        raise OverrideError(item, "expected key=value, e.g. learning_rate=1e-5")
    if not _KEY.match(key):
        raise OverrideError(item, "the key must be a name or a dotted path, e.g. ebft.stride=16")
    return key.split("."), parse_value(value)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}` (later items win)."""
    out: dict[str, Any] = {}
    for item in items:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[path[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `extra` merged in (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(config: dict[str, Any], items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return deep_merge(config, parse_overrides(items))


def split_args(items: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Split CLI leftovers into (`key=value` overrides, everything from the first non-override on).

    Used by `ebft serve CONFIG k=v -- --max-num-seqs 8`: the part after the overrides is passed
    through unchanged.
    """
    items = list(items)
    for i, item in enumerate(items):
        if not is_override(item):
            return items[:i], items[i:]
    return items, []


def get_path(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
