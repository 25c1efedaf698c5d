"""`python -m ebft_engine eval CONFIG [--adapter PATH]`: validation CE, CFM loss, sandboxed pass@1."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (its test_datasets are the held-out data)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. device=cpu")
    parser.add_argument("--adapter", default=None, help="a trained LoRA adapter folder (default: the base model)")
    parser.add_argument("--max-rows", type=int, default=None, help="evaluate only the first N held-out rows")
    parser.add_argument("--n-samples", type=int, default=4, help="samples per prompt for the CFM loss")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds each generated program may run")
    parser.add_argument("--log-dir", default=None, help="where to append the eval record (default: output_dir)")


def run(args: argparse.Namespace) -> int:
    from ebft_engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    from ebft_engine.eval import evaluate, format_report

    try:
        record = evaluate(cfg, args.adapter, max_rows=args.max_rows, n_samples=args.n_samples,
                          max_new_tokens=args.max_new_tokens, timeout_s=args.timeout, log_dir=args.log_dir)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"ebft eval: {error}", file=sys.stderr)
        return 1
    for line in format_report(record):
        print(line)
    return 0
