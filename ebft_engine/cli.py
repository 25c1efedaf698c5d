"""Engine command dispatcher: `python -m ebft_engine <command> ...`.

The `ebft` CLI (in ebft_tui) never imports the engine; it runs these commands as subprocesses.
Each command lives in `ebft_engine/commands/<name>.py` and exposes `add_arguments(parser)` and
`run(args) -> int`. Commands are imported lazily so that `validate` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "validate": "Check a config (and key=value overrides); print the resolved config or every error.",
    "schema": "Print the config schema as JSON (used by the TUI's parameter editor).",
    "train": "Run training in-process (strided, or structured against a running server).",
    "serve": "Start the generation server for a config (hf or vllm backend).",
    "eval": "Validation CE, CFM loss and sandboxed pass@1 for a config and optional adapter.",
    "prepare-model": "Convert the offline SmolLM2 GGUF into a cached transformers folder.",
}


def usage() -> str:
    lines = ["usage: python -m ebft_engine <command> [args...]", "", "commands:"]
    lines += [f"  {name:<14} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # Only the chosen command's module is imported: `validate` never pays for torch.
    module = importlib.import_module(f"ebft_engine.commands.{name.replace('-', '_')}")
    parser = argparse.ArgumentParser(prog=f"python -m ebft_engine {name}", description=COMMANDS[name])
    module.add_arguments(parser)
    args = parser.parse_intermixed_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
