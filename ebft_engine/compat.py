"""What ebft does with each key an axolotl EBFT config may hold: the table in `axolotl_keys.yaml`.

ebft promises that configs written for axolotl's EBFT run as they are (decisions.md §2), and
axolotl's config schema is that contract, not its examples. The table classifies every key of the
schema (read at the version the file names) as honoured, mapped, inert or refused; `config.py`
consults it for every key its own schema (`EbftConfig`) does not model, `validate --explain KEY`
prints a row, and `docs/axolotl-compat.md` is rendered from it (`scripts/axolotl_compat.py`).

Key paths use `[]` for list entries and `*` for any key of a section: `trl.beta`,
`datasets[].shards`, `fsdp_config.*`. `test_datasets[]` entries read the `datasets[]` rows.

This module imports only yaml and the standard library (config.py imports it).
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TABLE_FILE = Path(__file__).with_name("axolotl_keys.yaml")
CLASSES = ("honoured", "mapped", "inert", "refused")
CLASS_MEANING = {
    "honoured": "same meaning in ebft",
    "mapped": "ebft does the same under another name or mechanism",
    "inert": "no meaning for ebft, accepted with a warning",
    "refused": "would silently change the run, so it is an error (exit 2)",
}
LIST_ALIASES = {"test_datasets[]": "datasets[]"}
"""List sections whose entries read another section's rows."""


@dataclass(frozen=True)
class KeyRow:
    """One key of an axolotl config and what ebft does with it."""

    key: str
    cls: str
    group: str
    sample: Any
    note: str = ""
    to: str | None = None
    values: dict[Any, Any] | None = None
    accept: list[Any] = field(default_factory=list)
    with_: dict[str, Any] = field(default_factory=dict)
    mode: str | None = None
    legacy: bool = False
    example_key: str | None = None
    owner: str | None = None

    @property
    def is_wildcard(self) -> bool:
        return self.key.endswith(".*")

    def accepts(self, value: Any) -> bool:
        """A refused key's value that asks for exactly what ebft does anyway (`load_in_4bit: false`)."""
        return any(_same(value, ok) for ok in self.accept)

    def mapped_value(self, value: Any) -> tuple[bool, Any]:
        """(applies, value for `to`): without `values` the value passes as it is; with them, a
        value not listed asks for nothing (`bfloat16: false`)."""
        if self.values is None:
            return True, value
        for source, target in self.values.items():
            if _same(value, source):
                return True, target
        return False, None

    def sample_key(self) -> str:
        """The key a sample config writes (a wildcard row's example key)."""
        return self.key[:-1] + (self.example_key or "example") if self.is_wildcard else self.key

    def render(self, value: Any = None) -> str:
        """The row's note with `{value}` filled in (the docs show VALUE)."""
        return self.note.replace("{value}", "VALUE" if value is None else _show(value))


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps `True` apart from `1` (YAML values)."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


@dataclass(frozen=True)
class Group:
    title: str
    owner: str | None
    keys: list[str]


@dataclass(frozen=True)
class Table:
    """The whole table: axolotl's version, the rows by key path, the groups they are listed in."""

    version: str
    commit: str
    schema: str
    repository: str
    rows: dict[str, KeyRow]
    groups: list[Group]

    def lookup(self, pattern: str) -> KeyRow | None:
        """The row for a key path (`trl.beta`, `datasets[].shards`), a wildcard row of its section
        (`fsdp_config.*`) or None."""
        pattern = _alias(pattern)
        row = self.rows.get(pattern)
        if row is None and "." in pattern:
            row = self.rows.get(pattern.rsplit(".", 1)[0] + ".*")
        return row

    def has_children(self, pattern: str) -> bool:
        prefix = _alias(pattern) + "."
        return any(key.startswith(prefix) for key in self.rows)

    def children(self, pattern: str) -> list[str]:
        """The names of the keys listed directly under a section (`fsdp_config` -> offload_params, ...)."""
        prefix = _alias(pattern) + "." if pattern else ""
        return [key[len(prefix):] for key in self.rows
                if key.startswith(prefix) and "." not in key[len(prefix):] and not key.endswith("*")]


def _alias(pattern: str) -> str:
    for alias, target in LIST_ALIASES.items():
        if pattern.startswith(alias):
            return target + pattern[len(alias):]
    return pattern


def key_pattern(key: str) -> str:
    """A key as a user writes it (`datasets.0.shards`, `datasets[0].shards`) -> its row's path."""
    key = re.sub(r"\[\d*\]", "[]", key.strip())
    return re.sub(r"\.(\d+)(?=\.|$)", "[]", key)


@functools.lru_cache(maxsize=1)
def load_table() -> Table:
    """The table from `axolotl_keys.yaml` (read once)."""
    data = yaml.safe_load(TABLE_FILE.read_text(encoding="utf-8"))
    meta = data["axolotl"]
    rows: dict[str, KeyRow] = {}
    groups = []
    for group in data["groups"]:
        keys = []
        for key, entry in group["keys"].items():
            rows[key] = KeyRow(key=key, cls=entry["class"], group=group["title"], sample=entry.get("sample"),
                               note=entry.get("note", ""), to=entry.get("to"), values=entry.get("values"),
                               accept=list(entry.get("accept", [])), with_=dict(entry.get("with", {})),
                               mode=entry.get("mode"), legacy=bool(entry.get("legacy", False)),
                               example_key=entry.get("example_key"), owner=group.get("owner"))
            keys.append(key)
        groups.append(Group(title=group["title"], owner=group.get("owner"), keys=keys))
    return Table(version=str(meta["version"]), commit=str(meta["commit"]), schema=str(meta["schema"]),
                 repository=str(meta["repository"]), rows=rows, groups=groups)


# --------------------------------------------------------------------------------------------------
# validate --explain


def explain(key: str, schema_keys: dict[str, str] | None = None) -> str | None:
    """The row of `key` as a few lines of text, or None when the table does not list it.

    `schema_keys` (dotted key -> description) lets ebft's own keys, which axolotl does not have,
    answer too."""
    table = load_table()
    pattern = key_pattern(key)
    row = table.lookup(pattern)
    if row is None:
        if schema_keys and pattern in schema_keys:
            return (f"{pattern}: an ebft key (not in axolotl {table.version})\n"
                    f"  {schema_keys[pattern]}")
        return None
    lines = [f"{pattern}: {row.cls} ({CLASS_MEANING[row.cls]})"]
    if row.is_wildcard and pattern != row.key:
        lines[0] += f"  [row {row.key}]"
    if row.to:
        lines.append(f"  means: {row.to}" + (f" (values: {_show(row.values)})" if row.values else ""))
    if row.note:
        lines.append(f"  {row.render()}")
    if row.accept:
        lines.append(f"  accepted without error: {', '.join(_show(v) for v in row.accept)}")
    if row.mode:
        lines.append(f"  refused in {row.mode} mode only (the other mode ignores it)")
    override = row.sample_key().replace("[]", ".0")
    lines.append(f"  example (as an override): {override}={_show(row.sample)}")
    group = f"group: {row.group}" + (f" (owned by {row.owner})" if row.owner else "")
    source = f"not in axolotl {table.version}'s schema" if row.legacy else f"axolotl {table.version}"
    lines.append(f"  {group}; {source}")
    return "\n".join(lines)


def closest_keys(key: str, extra: list[str] | None = None, n: int = 3) -> list[str]:
    """Table keys (and `extra` ones) that look like `key`, for a did-you-mean."""
    names = list(dict.fromkeys([*load_table().rows, *(extra or [])]))
    return difflib.get_close_matches(key_pattern(key), names, n=n, cutoff=0.6)


# --------------------------------------------------------------------------------------------------
# docs/axolotl-compat.md


def ebft_only_keys() -> dict[str, str]:
    """ebft's own keys (in its schema, not in axolotl's) -> their descriptions."""
    from ebft_engine.config import schema_descriptions

    table = load_table()
    return {key: text for key, text in schema_descriptions().items()
            if table.lookup(key) is None and not key.startswith("test_datasets[]")}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row_line(row: KeyRow) -> str:
    what = row.render()
    if row.to:
        target = f"`{row.to}`" + (f" ({', '.join(f'{_show(k)} → {_show(v)}' for k, v in row.values.items())})"
                                   if row.values else "")
        what = f"means {target}" + (f"; {what}" if what else "")
    if row.accept:
        what += f" (accepted: {', '.join(f'`{_show(v)}`' for v in row.accept)})"
    if row.mode:
        what += f" (refused in {row.mode} mode only)"
    if row.legacy:
        what += " (not in this axolotl version's schema)"
    return f"| `{row.key}` | {row.cls} | {_cell(what.strip())} |"


def render_markdown(ebft_only: dict[str, str] | None = None) -> str:
    """The whole of docs/axolotl-compat.md. `ebft_only`: ebft's own keys (not axolotl's) and their
    descriptions, listed at the end."""
    table = load_table()
    counts = {c: sum(1 for r in table.rows.values() if r.cls == c) for c in CLASSES}
    out = [
        "# axolotl config keys in ebft",
        "",
        "<!-- Generated from ebft_engine/axolotl_keys.yaml by `python scripts/axolotl_compat.py --write`;",
        "     edit the table, not this file (tests/test_axolotl_compat.py checks they agree). -->",
        "",
        f"Every key of axolotl's config schema ({table.schema} at version {table.version}, commit",
        f"`{table.commit[:12]}`), and what ebft does with it. `ebft validate --explain KEY` prints one row.",
        "",
        "| class | meaning | keys |",
        "|---|---|---|",
        *(f"| {c} | {CLASS_MEANING[c]} | {counts[c]} |" for c in CLASSES),
        "",
        "A refused key whose value asks for what ebft does anyway (`load_in_4bit: false`) is accepted.",
        "A key nobody knows is an error that suggests the closest known key. Key paths: `trl.beta` is",
        "a key of the `trl:` section, `datasets[].shards` a key of every `datasets:` (and",
        "`test_datasets:`) entry, `fsdp_config.*` any key of that section.",
        "",
    ]
    for group in table.groups:
        out += [f"## {group.title}", ""]
        if group.owner:
            out += [f"Owned by {group.owner}: multi-process training lands there and changes these rows.", ""]
        out += ["| key | class | what ebft does |", "|---|---|---|"]
        out += [_row_line(table.rows[key]) for key in group.keys]
        out.append("")
    if ebft_only:
        out += ["## ebft's own keys", "", "Keys ebft adds (not in axolotl).", "",
                "| key | what it does |", "|---|---|"]
        out += [f"| `{key}` | {_cell(text)} |" for key, text in ebft_only.items()]
        out.append("")
    return "\n".join(out)
