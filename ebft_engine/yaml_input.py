"""Reading YAML a person wrote: bounded, strict, and still `yaml.safe_load`'s types.

`yaml.safe_load` is safe against code execution but not against size: ten lines of aliases
(`a: &a [x, x, x, x, x, x, x, x, x]`, `b: &b [*a, *a, ...]`, ...) describe billions of values,
which every later step (dropping empty keys, pydantic) expands in memory for minutes. It also
keeps the last of two equal keys without a word, and reads `yes`/`no`/`on`/`off` as booleans,
which pydantic then quietly turns into 1 and 0 where a number is expected.

`load_yaml(text, name)` is `yaml.safe_load` with limits: the text's size, the nesting depth, and
the number of values once every alias is expanded (counted on the node graph, so a bomb costs
nothing to refuse); a key given twice in one mapping is an error. Each error names the line.
`bool_for_number(annotation, value)` says whether a value is a YAML boolean standing where the
schema wants a number (the config schema refuses those).
"""

from __future__ import annotations

import os
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 1024 * 1024
"""A config is a few kilobytes; an inline chat template a few more."""
MAX_DEPTH = 32
"""Nesting levels of mappings and lists (a config uses 4)."""
MAX_VALUES = 100_000
"""Values (scalars, mappings, lists) once aliases are expanded."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlInputError(ValueError):
    """YAML that is too big, too deep, expands too far, or repeats a key; names the line."""

    def __init__(self, message: str, line: int | None = None):
        self.line = line
        super().__init__(f"line {line}: {message}" if line else message)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_DEPTH while composing (the composer
    recurses once per level, so this also keeps a deep document from exhausting the stack)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlInputError(f"the YAML nests deeper than {MAX_DEPTH} levels. A config needs "
                                     "a few; flatten it.", mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_duplicate_keys(node: MappingNode) -> None:
    """A key given twice in one mapping (merged `<<` keys may be overridden: that is their use)."""
    seen: dict[Any, int] = {}
    for key, _value in node.value:
        if key.tag == _MERGE_TAG or not isinstance(key, ScalarNode):
            continue
        if key.value in seen:
            raise YamlInputError(f"the key `{key.value}` appears twice in the same mapping (first at "
                                 f"line {seen[key.value]}); YAML would silently keep the last one. "
                                 "Keep one of them.", _line(key))
        seen[key.value] = _line(key)


def _too_deep(node: Node) -> YamlInputError:
    return YamlInputError(f"the YAML nests deeper than {MAX_DEPTH} levels once its aliases (*name) "
                          "are expanded. A config needs a few; flatten it.", _line(node))


def _check_graph(root: Node) -> None:
    """Walk the node graph once per node (so a bomb is refused in microseconds), counting the
    values and the nesting every alias would expand to; refuses more than MAX_VALUES values,
    deeper than MAX_DEPTH, a recursive alias, and a key repeated within a mapping."""
    seen: dict[int, tuple[int, int]] = {}  # node -> (values, height) of its expansion
    active: set[int] = set()

    def visit(node: Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in seen:
            if depth + seen[key][1] > MAX_DEPTH:
                raise _too_deep(node)
            return seen[key]
        if key in active:
            raise YamlInputError("an alias refers to a collection that contains it (a recursive "
                                 "alias). Write the values out instead.", _line(node))
        if depth > MAX_DEPTH:
            raise _too_deep(node)
        active.add(key)
        if isinstance(node, MappingNode):
            _check_duplicate_keys(node)
        values, height = 1, 1
        for child in _children(node):
            child_values, child_height = visit(child, depth + 1)
            values, height = values + child_values, max(height, child_height + 1)
        if values > MAX_VALUES:  # the innermost collection that crosses the limit: name its line
            raise YamlInputError(f"the YAML expands to more than {MAX_VALUES:,} values once its "
                                 "aliases (*name) are expanded. Aliases that repeat aliases grow "
                                 "exponentially; write the values out, or use fewer aliases.",
                                 _line(node))
        active.discard(key)
        seen[key] = (values, height)
        return values, height

    visit(root, 1)


def read_text(path: str | os.PathLike[str]) -> str:
    """The text of a YAML file, refusing one larger than MAX_BYTES before reading it whole."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise YamlInputError(f"the file is larger than {MAX_BYTES // 1024} KiB; a config is a few "
                             "kilobytes. Is this the right file?")
    return data.decode("utf-8")


def load_yaml(text: str, name: str = "<yaml>") -> Any:
    """`yaml.safe_load(text)` within the limits above; YamlInputError (with the line) otherwise.
    Syntax errors stay `yaml.YAMLError`."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise YamlInputError(f"{name} is larger than {MAX_BYTES // 1024} KiB; a config is a few "
                             "kilobytes.")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------------
# Booleans where the schema wants a number


def _members(annotation: Any) -> list[Any]:
    """The alternatives of an annotation, without None and Annotated wrappers."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in get_args(annotation) if a is not type(None) for m in _members(a)]
    return [annotation]


def _takes_bool(members: list[Any]) -> bool:
    return any(m is bool or (get_origin(m) is Literal and any(isinstance(v, bool) for v in get_args(m)))
               for m in members)


def _wants_number(members: list[Any]) -> bool:
    return not _takes_bool(members) and any(m in (int, float) for m in members)


def bool_for_number(annotation: Any, value: Any) -> bool:
    """True when `value` (or an item of it, for a list of numbers) is a boolean where the
    annotation wants a number: YAML reads `yes`, `no`, `on`, `off` as true/false, and pydantic
    would then take true as 1."""
    members = _members(annotation)
    if isinstance(value, bool):
        return _wants_number(members)
    if isinstance(value, list):
        item_types = [m for lst in members if get_origin(lst) is list for m in _members(get_args(lst)[0])]
        return _wants_number(item_types) and any(isinstance(v, bool) for v in value)
    return False
