"""`python -m ebft_engine prepare-model`: convert the offline SmolLM2 GGUF into cached folders.

Idempotent: a folder already in the cache is left alone, and concurrent runs convert once.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32", "both"],
        default="both",
        help="which folder(s) to write; tests use float32, training on CPU bfloat16 (default: both)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing unless it fails")


def run(args: argparse.Namespace) -> int:
    import sys

    from ebft_engine.modeling import ModelLoadError, prepare_smollm2

    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    try:
        folders = prepare_smollm2(dtypes, quiet=args.quiet)
    except ModelLoadError as error:
        print(f"prepare-model: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        for folder in folders:
            print(folder)
    return 0
