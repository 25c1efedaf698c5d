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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ebft_engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"ebft_engine.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
