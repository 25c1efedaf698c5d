"""`python -m ebft_engine train CONFIG [key=value ...] [--no-resume [--overwrite]]`.

Re-running the same command continues the run in its output_dir from the latest checkpoint
(the newest one that verifies against its manifest). With `EBFT_RUN_DIR` set (the `ebft`
launcher sets it), that folder is the output_dir. Before torch is imported, the config and what the
run needs beyond it are checked (`ebft_engine.preflight`, as `validate` does).
Exit codes: 0 done, 1 failed, 2 bad config, data files, output_dir, device or run dir, or data no
step can train on, 3 non-finite loss/gradient, 143/130 stopped by SIGTERM/SIGINT after a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (a preset or your own)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, dotted for nested ones (ebft.stride=16)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="resume", action="store_true", default=True,
                       help="continue from the latest checkpoint in output_dir (the default)")
    group.add_argument("--no-resume", dest="resume", action="store_false",
                       help="start from scratch; refuses an output_dir that holds a run unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --no-resume: delete the run already in output_dir first")


def run(args: argparse.Namespace) -> int:
    from ebft_engine import watchdog
    from ebft_engine.config import ConfigError
    from ebft_engine.preflight import load_and_check

    watchdog.install_stop_handlers()
    watchdog.start_parent_watchdog()
    overrides = list(args.overrides)
    if os.environ.get("EBFT_RUN_DIR"):
        overrides.append(f"output_dir={os.environ['EBFT_RUN_DIR']}")
    try:
        cfg = load_and_check(args.config, overrides)  # data, output_dir, device: before torch
    except ConfigError as error:
        problems = getattr(error, "problems", None) or []
        print(f"error: {args.config}: invalid config", file=sys.stderr)
        for problem in problems:
            print(f"  {problem.key}: {problem.message}", file=sys.stderr)
        if not problems:
            print(f"  {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from ebft_engine.train import train  # torch is imported only once the config is known good

    return train(cfg, resume=args.resume, overwrite=args.overwrite)
