"""Dataset transforms: the spec's built-ins (one module each) and loading custom ones.

A dataset entry's `type: module.function` names a transform factory with the spec's contract:

    def transform(cfg, **kwargs):          # cfg: the run's EbftConfig (`cfg.sequence_len`, ...)
        def transform_fn(example, tokenizer=None) -> dict: ...
        return transform_fn, {"remove_columns": "__all__"}

The second element holds options for the mapping step: `remove_columns` (`"__all__"` = drop every
original column, or a list of names), `batched: True` (axolotl's contract: `transform_fn` gets a
dict of columns and returns one, possibly with a different number of rows), and `explode: True`
(ours: `transform_fn` gets one row and returns lists; output row i takes element i of each).

Built-in module names win over importable modules of the same name; any other `module` is
imported from the current directory or PYTHONPATH.

What lives here: this loader and the spec's built-ins, one module each (`ebft_opencode`,
`ebft_strided_structured`, `ebft_strided_chat`, `ebft_chat_multiturn`, `ebft_reasoning`,
`ebft_pretrain`). May import: config and data (prompt rendering); never torch at module level,
nor the modes or train.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable

from ebft_engine.config import EbftConfig

BUILTIN_MODULES = (
    "ebft_opencode",
    "ebft_strided_structured",
    "ebft_strided_chat",
    "ebft_chat_multiturn",
    "ebft_reasoning",
    "ebft_pretrain",
)

TransformFn = Callable[..., dict]


class TransformError(ValueError):
    """A dataset `type` that cannot be loaded, or a transform that broke its contract."""


def builtin_names() -> list[str]:
    """Every built-in `type` value (`module.function`)."""
    names = []
    for module_name in BUILTIN_MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        names += [f"{module_name}.{fn}" for fn in getattr(module, "TRANSFORMS", ("transform",))]
    return names


def _import_module(type_name: str, module_name: str):
    builtin = module_name.removeprefix("ebft.")  # axolotl's package-qualified spelling
    if builtin in BUILTIN_MODULES:
        return importlib.import_module(f"{__name__}.{builtin}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise TransformError(
                f"dataset type {type_name!r}: no module {module_name!r} in the current directory "
                f"({cwd}) or on PYTHONPATH, and it is not a built-in "
                f"({', '.join(BUILTIN_MODULES)})"
            ) from error
        raise TransformError(f"dataset type {type_name!r}: importing {module_name!r} failed: "
                             f"{_where_raised(error, _module_file(module_name))}{error}") from error
    except Exception as error:  # the module's own code raised while it was imported
        raise TransformError(
            f"dataset type {type_name!r}: importing module {module_name!r} failed at "
            f"{_where_raised(error, _module_file(module_name))}{type(error).__name__}: {error}. Fix the module; "
            f"`python -c 'import {module_name}'` shows the whole traceback"
        ) from error


def _module_file(module_name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _where_raised(error: BaseException, module_file: str | None = None) -> str:
    """`file.py line N: ` of the line that raised: the innermost frame in `module_file` (the
    user's module, rather than the library it called), else the innermost one; '' when none."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename} line {error.lineno}: "
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<frozen")]
    if not frames:
        return ""
    own = []
    if module_file and os.path.exists(module_file):
        own = [f for f in frames if os.path.exists(f.filename) and os.path.samefile(f.filename, module_file)]
    frame = (own or frames)[-1]
    return f"{frame.filename} line {frame.lineno}: "


def transform_module_file(type_name: str) -> "Path | None":
    """The source file of the module a `type` names (None when it cannot be imported): what a
    cache of transformed rows must notice changing (ebft_engine/prepared.py)."""
    from pathlib import Path

    module_name = str(type_name).rpartition(".")[0]
    try:
        module = _import_module(type_name, module_name)
    except TransformError:
        return None
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def load_transform(type_name: str, cfg: EbftConfig, **kwargs: Any) -> tuple[TransformFn, dict]:
    """Resolve `type_name` to its factory, call it with `cfg`, and check what it returns."""
    module_name, _, function_name = str(type_name).rpartition(".")
    if not module_name or not function_name:
        raise TransformError(
            f"dataset type {type_name!r}: expected `module.function`, e.g. `ebft_opencode.transform`"
        )
    module = _import_module(type_name, module_name)
    factory = getattr(module, function_name, None)
    if not callable(factory):
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise TransformError(
            f"dataset type {type_name!r}: module {module_name!r} has no function {function_name!r}"
            + (f" (it has: {', '.join(available)})" if available else "")
        )
    try:
        result = factory(cfg, **kwargs)
    except Exception as error:
        raise TransformError(
            f"dataset type {type_name!r}: {function_name}(cfg) raised "
            f"{_where_raised(error, getattr(module, '__file__', None))}"
            f"{type(error).__name__}: {error}"
        ) from error
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not callable(result[0])
        or not isinstance(result[1], (dict, type(None)))
    ):
        raise TransformError(
            f"dataset type {type_name!r}: {function_name}(cfg, **kwargs) must return "
            f"(transform_fn, {{\"remove_columns\": \"__all__\"}}), got {type(result).__name__}"
        )
    return result[0], dict(result[1] or {})


# --- helpers shared by the built-ins ---------------------------------------------------------------

ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def get_field(example: dict, *names: str) -> Any:
    """The first of `names` present in `example` (axolotl's fallbacks); KeyError names the first."""
    for name in names:
        if name in example and example[name] is not None:
            return example[name]
    raise KeyError(names[0])


def get_messages(example: dict) -> list[dict]:
    """`messages` (OpenAI format) or `conversations` (also ShareGPT's from/value), as
    [{"role", "content"}, ...] with every other key of a message kept."""
    raw = get_field(example, "messages", "conversations")
    messages = []
    for msg in raw:
        if "role" not in msg and "from" in msg:
            msg = {**{k: v for k, v in msg.items() if k not in ("from", "value")},
                   "role": ROLE_ALIASES.get(msg["from"], msg["from"]), "content": msg.get("value")}
        messages.append({k: v for k, v in msg.items() if v is not None or k in ("role", "content")})
    return messages


def require_tokenizer(tokenizer: Any, name: str) -> None:
    if tokenizer is None:
        raise TransformError(f"{name} tokenizes: call transform_fn(example, tokenizer=...)")
