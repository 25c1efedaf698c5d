"""The engine's shape, checked on its source (issue 17): config is read only as typed attributes
of `EbftConfig`, never through string lookups with a second default.

Each checker is also run on a small snippet that breaks its rule, so a checker that finds
nothing because it is broken fails here too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "ebft_engine"

CONFIG_TYPES = {"EbftConfig", "EbftSection", "TrlSection", "VllmSection", "DatasetConfig",
                "GenerationKwargs", "GradientCheckpointingKwargs"}
"""The schema's classes (ebft_engine/config.py): the only types a `cfg` parameter may have."""

STRING_LOOKUP = re.compile(r"\b(_cfg|opt|_get)\((self\.)?cfg, *\"")
"""`opt(cfg, "warmup_steps", 0)`, `_cfg(cfg, "trl.temperature", 0.7)`: a key as a string and a
second default beside the schema's."""

CONFIG_NAMES = {"cfg", "spec"}
"""Names the engine gives a config or one of its sections (`spec`: a `datasets:` entry)."""


def engine_sources() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in sorted(ENGINE.rglob("*.py"))}


def _rooted_at_config(node: ast.AST) -> bool:
    """`cfg`, `cfg.trl`, `self.cfg`, `self.cfg.ebft`, `spec` ..."""
    while isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in CONFIG_NAMES:
            return True
        node = node.value
    return isinstance(node, ast.Name) and node.id in CONFIG_NAMES


def _annotation_names(annotation: ast.AST | None) -> set[str]:
    if annotation is None:
        return set()
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):  # "EbftConfig"
        annotation = ast.parse(annotation.value, mode="eval").body
    return {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(annotation) if isinstance(n, ast.Attribute)}


def config_lookup_problems(source: str, where: str) -> list[str]:
    """Every way of reading config that bypasses the schema's types, with file:line."""
    problems = [f"{where}:{source.count(chr(10), 0, m.start()) + 1}: string lookup {m.group(0)!r}"
                for m in STRING_LOOKUP.finditer(source)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                if arg.arg == "cfg" and not _annotation_names(arg.annotation) & CONFIG_TYPES:
                    shown = ast.unparse(arg.annotation) if arg.annotation is not None else "no annotation"
                    problems.append(f"{where}:{node.lineno}: parameter `{arg.arg}` has {shown}, "
                                    f"not one of the schema's types")
        elif isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and node.args
                    and _rooted_at_config(node.args[0])):
                problems.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            elif (isinstance(func, ast.Attribute) and func.attr == "get"
                  and _rooted_at_config(func.value)):
                problems.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return problems


def test_the_engine_reads_config_only_as_typed_attributes():
    problems = [p for path, text in engine_sources().items() for p in config_lookup_problems(text, path)]
    assert problems == [], "\n".join(problems)


def test_the_config_lookup_check_finds_each_kind_of_lookup():
    bad = '''
def opt(cfg, key, default): ...
def a(cfg: Any, model):
    return opt(cfg, "warmup_steps", 0) + _cfg(self.cfg, "trl.temperature", 0.7)
def b(cfg: "EbftConfig"):
    return getattr(cfg.trl, "top_k", None) or cfg.get("seed") or getattr(self.cfg, "seed", 0)
def c(spec: DatasetConfig | None, cfg: EbftConfig):
    return getattr(spec, "path", "") + cfg.trl.temperature
'''
    found = config_lookup_problems(bad, "x.py")
    assert any("string lookup 'opt(cfg, \"'" in p for p in found)
    assert any("string lookup '_cfg(self.cfg, \"'" in p for p in found)
    assert any("x.py:2: parameter `cfg` has no annotation" in p for p in found)
    assert any("x.py:3: parameter `cfg` has Any" in p for p in found)
    assert any("getattr(cfg.trl, 'top_k', None)" in p for p in found)
    assert any("cfg.get('seed')" in p for p in found)
    assert any("getattr(self.cfg, 'seed', 0)" in p for p in found)
    assert any("getattr(spec, 'path', '')" in p for p in found)
    assert not any(":5: parameter" in p or ":7: parameter" in p for p in found)  # typed: fine
    assert len(found) == 8, found
