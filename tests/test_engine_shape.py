"""The engine's shape, checked on its source (issue 17): config is read only as typed attributes
of `EbftConfig`, never through string lookups with a second default; no function is longer than
MAX_FUNCTION_LINES unless its docstring says why ("Long because ...").

    python tests/test_engine_shape.py [N]     the N longest functions of ebft_engine (default 20)

Each checker is also run on a small snippet that breaks its rule, so a checker that finds
nothing because it is broken fails here too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "ebft_engine"

NOT_THE_RUN_CONFIG = {
    "ebft_engine/sandbox/unshare_init.py": "its `cfg` is the jail's JSON spec: a standard-library-only "
                                           "script that runs inside the jail, without ebft_engine",
}
"""Files whose `cfg` is not an ebft config (so the typed-config rule does not apply), and why."""

CONFIG_TYPES = {"EbftConfig", "EbftSection", "TrlSection", "VllmSection", "DatasetConfig",
                "GenerationKwargs", "GradientCheckpointingKwargs"}
"""The schema's classes (ebft_engine/config.py): the only types a `cfg` parameter may have."""

STRING_LOOKUP = re.compile(r"\b(_cfg|opt|_get)\((self\.)?cfg, *\"")
"""`opt(cfg, "warmup_steps", 0)`, `_cfg(cfg, "trl.temperature", 0.7)`: a key as a string and a
second default beside the schema's."""

MAX_FUNCTION_LINES = 80
LONG_BECAUSE = re.compile(r"\bLong because\b")
"""How a docstring says why its function may be longer than MAX_FUNCTION_LINES."""

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
    problems = [p for path, text in engine_sources().items() if path not in NOT_THE_RUN_CONFIG
                for p in config_lookup_problems(text, path)]
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


def function_lengths(source: str, where: str) -> list[tuple[int, str, str]]:
    """(lines, "file:line name", docstring) of every function and method, nested ones included
    (a function's lines include its docstring and its nested functions)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.end_lineno - node.lineno + 1, f"{where}:{node.lineno} {node.name}",
                        ast.get_docstring(node) or ""))
    return out


def too_long(source: str, where: str) -> list[str]:
    return [f"{name}: {n} lines" for n, name, doc in function_lengths(source, where)
            if n > MAX_FUNCTION_LINES and not LONG_BECAUSE.search(doc)]


def test_no_engine_function_is_longer_than_the_limit_without_saying_why():
    problems = [p for path, text in engine_sources().items() for p in too_long(text, path)]
    assert problems == [], "\n".join(problems)


def test_the_length_check_counts_lines_and_reads_the_reason():
    body = "\n".join(f"    x = {i}" for i in range(MAX_FUNCTION_LINES))
    source = (f"def short():\n    return 1\n\n"
              f"def long():\n{body}\n\n"
              f'def explained():\n    """Long because one table reads best whole."""\n{body}\n')
    lengths = {name.split()[-1]: n for n, name, _ in function_lengths(source, "x.py")}
    assert lengths == {"short": 2, "long": MAX_FUNCTION_LINES + 1, "explained": MAX_FUNCTION_LINES + 2}
    assert too_long(source, "x.py") == [f"x.py:4 long: {MAX_FUNCTION_LINES + 1} lines"]


FORBIDDEN_IMPORTS = {
    "ebft_engine/rollout/": ("ebft_engine.structured", "ebft_engine.strided", "ebft_engine.train"),
    "ebft_engine/strided/": ("ebft_engine.structured", "ebft_engine.rollout", "ebft_engine.train"),
    "ebft_engine/structured/": ("ebft_engine.strided", "ebft_engine.train"),
    "ebft_engine/transforms/": ("ebft_engine.structured", "ebft_engine.strided", "ebft_engine.rollout",
                                "ebft_engine.train", "torch"),
    "ebft_engine/sandbox/": ("torch", "ebft_engine.config", "ebft_engine.eval", "ebft_engine.train",
                             "ebft_engine.structured", "ebft_engine.strided", "ebft_engine.rollout"),
}
"""What each package's `__init__` docstring says it never imports (module-level or not)."""


def imported_modules(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def import_problems(sources: dict[str, str]) -> list[str]:
    problems = []
    for path, text in sources.items():
        modules = imported_modules(text)
        for folder, forbidden in FORBIDDEN_IMPORTS.items():
            if path.startswith(folder):
                problems += [f"{path} imports {m}" for m in sorted(modules)
                             if any(m == f or m.startswith(f + ".") for f in forbidden)]
        if not path.startswith(("ebft_engine/cli.py", "ebft_engine/commands/")):
            problems += [f"{path} imports {m} (only cli.py dispatches commands)" for m in sorted(modules)
                         if m.startswith("ebft_engine.commands")]
    return problems


def test_packages_import_only_what_their_docstrings_allow():
    problems = import_problems(engine_sources())
    assert problems == [], "\n".join(problems)


def test_the_import_check_sees_local_and_from_imports():
    sources = {"ebft_engine/rollout/x.py": "def f():\n    from ebft_engine.structured.loss import grpo_loss\n",
               "ebft_engine/strided/y.py": "import ebft_engine.train\nfrom ebft_engine import rollout\n",
               "ebft_engine/transforms/z.py": "import torch.nn\n",
               "ebft_engine/eval.py": "from ebft_engine.commands import serve\n",
               "ebft_engine/structured/ok.py": "from ebft_engine.rollout.client import ServerError\n"}
    assert import_problems(sources) == [
        "ebft_engine/rollout/x.py imports ebft_engine.structured.loss",
        "ebft_engine/rollout/x.py imports ebft_engine.structured.loss.grpo_loss",
        "ebft_engine/strided/y.py imports ebft_engine.rollout",
        "ebft_engine/strided/y.py imports ebft_engine.train",
        "ebft_engine/transforms/z.py imports torch.nn",
        "ebft_engine/eval.py imports ebft_engine.commands (only cli.py dispatches commands)",
        "ebft_engine/eval.py imports ebft_engine.commands.serve (only cli.py dispatches commands)",
    ]


if __name__ == "__main__":
    import sys

    top = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    rows = sorted((row for path, text in engine_sources().items() for row in function_lengths(text, path)),
                  reverse=True)
    for n, name, _ in rows[:top]:
        print(f"{n:5d}  {name}")
