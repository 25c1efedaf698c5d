"""The bridge to the engine: `python -m ebft_engine <command>` subprocesses, never an import.

`validate` and `schema` are quick (no torch); the CLI, the launch planner and the TUI's parameter
editor call them. `train`/`serve`/`eval` are launched by `ebft_tui.runs` or the CLI.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ebft_tui.runs.lifeline import guard_argv

VALIDATE_TIMEOUT_S = 180.0


class EngineError(RuntimeError):
    """The engine command could not run or answered something unreadable."""


class ConfigInvalid(ValueError):
    """A config with problems; `.problems` is a list of (key, message)."""

    def __init__(self, problems: list[tuple[str, str]], source: str = ""):
        self.problems = problems
        self.source = source
        first = f"{problems[0][0]}: {problems[0][1]}" if problems else "invalid config"
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{source + ': ' if source else ''}{first}{more}")


@dataclass
class ValidationResult:
    ok: bool
    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None

    def raise_for_problems(self, source: str = "") -> None:
        if not self.ok:
            raise ConfigInvalid(self.problems or [("config", "the engine rejected it")], source)


def engine_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ebft_engine", *[str(a) for a in args]]


def engine_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def _tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _parse_validate_output(proc: subprocess.CompletedProcess) -> ValidationResult:
    out = proc.stdout.strip()
    data: Any = None
    if out:
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            # Tolerate log lines before the JSON document: take the last line that parses.
            for line in reversed(out.splitlines()):
                try:
                    data = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
    if not isinstance(data, dict):
        detail = _tail(proc.stderr or proc.stdout) or f"exit code {proc.returncode}"
        return ValidationResult(ok=False, problems=[("engine", f"`ebft_engine validate` failed: {detail}")])
    problems = []
    for p in data.get("problems") or []:
        if isinstance(p, dict):
            problems.append((str(p.get("key", "")), str(p.get("message", ""))))
        else:
            problems.append(("", str(p)))
    warnings = []
    for w in data.get("warnings") or []:
        if isinstance(w, dict):
            key, msg = w.get("key"), w.get("message", "")
            warnings.append(f"{key}: {msg}" if key else str(msg))
        else:
            warnings.append(str(w))
    ok = bool(data.get("ok", not problems)) and not problems and proc.returncode == 0
    if not ok and not problems:
        problems = [("engine", _tail(proc.stderr) or f"exit code {proc.returncode}")]
    config = data.get("config")
    return ValidationResult(ok=ok, problems=problems, warnings=warnings, config=config if isinstance(config, dict) else None)


def validate(
    config_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    write_resolved: str | Path | None = None,
    timeout_s: float = VALIDATE_TIMEOUT_S,
) -> ValidationResult:
    """`python -m ebft_engine validate CONFIG [k=v ...] --json [--write-resolved PATH]`."""
    argv = engine_argv("validate", str(config_path), *overrides, "--json")
    if write_resolved is not None:
        argv += ["--write-resolved", str(write_resolved)]
    try:
        # guarded: the engine dies with us (subprocess.run blocks this thread until the child ends,
        # so the forking thread outlives it, as PR_SET_PDEATHSIG needs)
        proc = subprocess.run(
            guard_argv(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s,
            env=engine_env(),
        )
    except subprocess.TimeoutExpired:
        return ValidationResult(ok=False, problems=[("engine", f"`ebft_engine validate` took more than {timeout_s:.0f} s")])
    except OSError as e:
        return ValidationResult(ok=False, problems=[("engine", f"cannot run the engine: {e}")])
    return _parse_validate_output(proc)


def explain_key(key: str, timeout_s: float = VALIDATE_TIMEOUT_S) -> tuple[int, str, str]:
    """`python -m ebft_engine validate --explain KEY`: (exit code, the key's row, the error text)."""
    argv = engine_argv("validate", "--explain", key)
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s,
                              env=engine_env())
    except subprocess.TimeoutExpired:
        raise EngineError(f"`ebft_engine validate --explain` took more than {timeout_s:.0f} s") from None
    except OSError as e:
        raise EngineError(f"cannot run the engine: {e}") from None
    return proc.returncode, proc.stdout, proc.stderr


def validate_dict(cfg: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> ValidationResult:
    """Validate an in-memory config (the TUI's editor) through a temporary YAML file."""
    with tempfile.TemporaryDirectory(prefix="ebft-validate-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        return validate(path, overrides)


@functools.lru_cache(maxsize=1)
def _schema_json() -> str:
    try:
        proc = subprocess.run(
            guard_argv(engine_argv("schema")), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=VALIDATE_TIMEOUT_S, env=engine_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EngineError(f"`ebft_engine schema` could not run: {e}") from e
    if proc.returncode != 0:
        raise EngineError(f"`ebft_engine schema` failed: {_tail(proc.stderr) or proc.returncode}")
    return proc.stdout


def schema_fields() -> list[dict[str, Any]]:
    """The engine's config fields (cached for the process): a list of dicts (key, type, default, ...)."""
    try:
        data = json.loads(_schema_json())
    except json.JSONDecodeError as e:
        raise EngineError(f"`ebft_engine schema` printed something that is not JSON: {e}") from e
    if isinstance(data, dict):
        data = data.get("fields", data.get("properties", []))
        if isinstance(data, dict):
            data = [{"key": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in data.items()]
    if not isinstance(data, list):
        raise EngineError("`ebft_engine schema` did not print a list of fields")
    return [dict(f) for f in data if isinstance(f, dict)]
