"""`python -m ebft_engine validate CONFIG [key=value ...] [--json] [--write-resolved PATH]`, or
`python -m ebft_engine validate --explain KEY`.

Checks a config and its overrides the way training will, before anything is loaded (no torch, no
network), and reports every problem at once: first the config's own keys and rules, then what the
run needs beyond them (`ebft_engine.preflight`: data files line by line, transforms, output_dir,
device, a local base_model).

Plain output (a person at a terminal):
- valid: the resolved config (every key, defaults filled in) as YAML on stdout; warnings on stderr
  as `warning: ...` lines, then one `ok: ...` line on stderr; exit 0.
- invalid: every problem on stderr, one paragraph each, each naming its key; exit 2.

`--json` (the TUI's parameter editor and the launcher; a stable contract): one JSON document on
stdout, whatever happens:
    {"ok": bool,
     "problems": [{"key": "ebft.stride", "message": "..."}, ...],
     "warnings": ["...", ...],
     "config": {...resolved config...} | null}
exit 0 when ok, 2 when the config has problems, 1 on an internal error (then one problem with key
"engine").

`--write-resolved PATH` (only when valid) writes the resolved YAML to PATH atomically (a temporary
file beside it, then rename): the launcher's RUN_DIR/config.yaml, which `load_config` reads back as
the same config.

`--explain KEY` (no config needed) prints what ebft does with one key an axolotl config may hold:
its row of ebft_engine/axolotl_keys.yaml (honoured, mapped, inert or refused, and why), or, for a
key of ebft's own, its description; exit 0. A key neither knows: exit 2 with the closest keys.

Never prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ebft.diversity_coef=0.5")
    parser.add_argument("--json", action="store_true", help="print one JSON document (ok, problems, warnings, config)")
    parser.add_argument("--write-resolved", metavar="PATH", default=None,
                        help="write the resolved config as YAML to PATH (atomically) when it is valid")
    parser.add_argument("--explain", metavar="KEY", default=None,
                        help="print what ebft does with KEY (e.g. save_strategy, trl.beta, fsdp_config.offload_params)")


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def resolved_header(source: str, overrides: list[str]) -> str:
    lines = [f"# Resolved by `ebft_engine validate` from {source}"]
    if overrides:
        lines.append("# with overrides: " + " ".join(overrides))
    lines.append("# Every key is shown with the value the run uses (defaults filled in).")
    return "\n".join(lines) + "\n"


def explain_key(key: str) -> int:
    """`--explain KEY`: the key's row (or ebft's own description of it); exit 2 naming close keys."""
    from ebft_engine.compat import closest_keys, explain
    from ebft_engine.config import schema_descriptions

    ours = schema_descriptions()
    text = explain(key, ours)
    if text is not None:
        print(text)
        return 0
    close = closest_keys(key, list(ours))
    hint = f" Did you mean {', '.join(f'`{k}`' for k in close)}?" if close else ""
    print(f"`{key}` is neither a key of axolotl's config schema nor one of ebft's.{hint}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.explain:
        return explain_key(args.explain)
    if args.config is None:
        print("validate needs a CONFIG file (or --explain KEY)", file=sys.stderr)
        return 2
    overrides = list(args.overrides or [])
    try:
        from ebft_engine.config import ConfigError
        from ebft_engine.preflight import load_and_check

        try:
            cfg = load_and_check(args.config, overrides)
        except ConfigError as error:
            if args.json:
                _print_json(False, [p.to_dict() for p in error.problems], [], None)
            else:
                print(str(error), file=sys.stderr)
            return 2
        text = cfg.to_yaml()
        if args.write_resolved:
            try:
                write_atomic(args.write_resolved, resolved_header(args.config, overrides) + text)
            except OSError as error:
                problem = {"key": "--write-resolved",
                           "message": f"cannot write the resolved config to {args.write_resolved}: {error}"}
                if args.json:
                    _print_json(False, [problem], list(cfg.warnings), None)
                else:
                    print(problem["message"], file=sys.stderr)
                return 2
        if args.json:
            _print_json(True, [], list(cfg.warnings), cfg.to_dict())
        else:
            sys.stdout.write(text)
            for warning in cfg.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            n = len(cfg.warnings)
            mode = "structured async" if cfg.is_async else cfg.mode
            print(f"ok: {args.config} is a valid {mode} config"
                  + (f" ({n} warning{'s' if n != 1 else ''})" if n else ""), file=sys.stderr)
        return 0
    except Exception as error:  # a bug in ebft: say so in one line, never a traceback
        message = f"internal error while validating (a bug in ebft): {type(error).__name__}: {error}"
        if args.json:
            _print_json(False, [{"key": "engine", "message": message}], [], None)
        else:
            print(message, file=sys.stderr)
        return 1


def _print_json(ok: bool, problems: list[dict], warnings: list[str], config: dict | None) -> None:
    doc = {"ok": ok, "problems": problems, "warnings": warnings, "config": config}
    sys.stdout.write(json.dumps(doc) + "\n")
