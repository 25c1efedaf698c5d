"""`python -m ebft_engine eval CONFIG [--adapter PATH] [--unsafe-exec]`: validation CE, CFM loss, sandboxed pass@1.

pass@1 runs model-written code, so it needs an OS jail; without one it exits 2 saying how to get
one, unless `--unsafe-exec` is given."""

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
    parser.add_argument("--unsafe-exec", action="store_true",
                        help="if no OS sandbox (bubblewrap, unshare) works here, run generated code anyway with "
                             "only rlimits and a timeout; the eval record carries a warning (see docs/security.md)")


def run(args: argparse.Namespace) -> int:
    from ebft_engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    from ebft_engine.eval import evaluate, format_report
    from ebft_engine.modeling import ModelLoadError
    from ebft_engine.sandbox import SandboxUnavailable

    try:
        record = evaluate(cfg, args.adapter, max_rows=args.max_rows, n_samples=args.n_samples,
                          max_new_tokens=args.max_new_tokens, timeout_s=args.timeout, log_dir=args.log_dir,
                          unsafe_exec=args.unsafe_exec)
    except SandboxUnavailable as error:
        print(f"ebft eval: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError, ModelLoadError) as error:
        print(f"ebft eval: {error}", file=sys.stderr)
        return 1
    for line in format_report(record):
        print(line)
    return 0
