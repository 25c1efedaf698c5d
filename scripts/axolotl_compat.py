#!/usr/bin/env python3
"""docs/axolotl-compat.md from the key table, and the table against an axolotl checkout.

    python scripts/axolotl_compat.py --write            regenerate docs/axolotl-compat.md
    python scripts/axolotl_compat.py --check            exit 1 when the doc is out of date
    python scripts/axolotl_compat.py --against DIR      list keys of axolotl's schema (DIR: its
                                                        src/axolotl/utils/schemas/) the table lacks,
                                                        and table rows that schema no longer has

`--against` reads the schema's class bodies with `ast` (field names, aliases, bases); nothing of
axolotl is imported or copied. Run it when moving the table to a new axolotl version, then
classify what it lists in ebft_engine/axolotl_keys.yaml and update its `version` and `commit`.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "axolotl-compat.md"
sys.path.insert(0, str(REPO))

# axolotl's section models and where their keys live in a config
SECTIONS = {"TRLConfig": "trl", "VllmConfig": "vllm", "EBFTConfig": "ebft", "SFTDataset": "datasets[]",
            "FSDPConfig": "fsdp_config", "SpecialTokensConfig": "special_tokens"}
ROOT = "AxolotlInputConfig"


def render() -> str:
    from ebft_engine.compat import ebft_only_keys, render_markdown

    return render_markdown(ebft_only_keys())


def schema_keys(schema_dir: Path) -> set[str]:
    """Every key path of axolotl's config: the root model's fields (through its bases) and the
    fields of the section models above."""
    classes: dict[str, tuple[list[str], list[str]]] = {}
    for path in sorted(schema_dir.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                names = []
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        alias = next((kw.value.value for kw in getattr(stmt.value, "keywords", [])
                                      if kw.arg == "alias" and isinstance(kw.value, ast.Constant)), None)
                        names += [stmt.target.id] + ([alias] if alias else [])  # both work (populate_by_name)
                classes[node.name] = ([ast.unparse(b) for b in node.bases], names)

    def fields(name: str) -> list[str]:
        bases, own = classes.get(name, ([], []))
        return [f for base in bases for f in fields(base)] + own

    keys = set(fields(ROOT))
    for model, prefix in SECTIONS.items():
        keys |= {f"{prefix}.{f}" for f in fields(model)}
    return keys


def compare(schema_dir: Path) -> int:
    from ebft_engine.compat import load_table

    table = load_table()
    theirs = schema_keys(schema_dir)
    missing = sorted(k for k in theirs if table.lookup(k) is None)
    sections = set(SECTIONS.values())

    def in_an_open_dict(key: str) -> bool:  # `trl.generation_kwargs.stop_token_ids`: a free-form dict's key
        parent = key.rsplit(".", 1)[0]
        return "." in key and parent in theirs and parent not in sections

    gone = sorted(k for k, row in table.rows.items()
                  if not row.legacy and not row.is_wildcard and k not in theirs and not in_an_open_dict(k))
    stale = sorted(k for k, row in table.rows.items() if row.legacy and k in theirs)
    for key in missing:
        print(f"not in the table: {key}")
    for key in stale:
        print(f"marked legacy but in that schema: {key}")
    for key in gone:
        print(f"not in that schema (mark legacy or remove): {key}")
    print(f"{len(theirs)} schema keys, {len(table.rows)} rows: {len(missing)} missing, {len(gone)} gone")
    return 1 if missing or stale else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", action="store_true", help="regenerate docs/axolotl-compat.md")
    what.add_argument("--check", action="store_true", help="exit 1 when the doc is out of date")
    what.add_argument("--against", metavar="DIR", type=Path, help="axolotl's src/axolotl/utils/schemas/ folder")
    args = parser.parse_args(argv)
    if args.against:
        return compare(args.against)
    text = render()
    if args.write:
        DOC.write_text(text, encoding="utf-8")
        print(f"wrote {DOC.relative_to(REPO)}")
        return 0
    if DOC.is_file() and DOC.read_text(encoding="utf-8") == text:
        return 0
    print(f"{DOC.relative_to(REPO)} is out of date: run python scripts/axolotl_compat.py --write", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
