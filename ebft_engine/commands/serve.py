"""`python -m ebft_engine serve CONFIG [key=value ...] [--port N] [--host H]`: the generation server.

`vllm.backend: hf` runs our transformers server in this process (foreground); `vllm.backend: vllm`
starts `vllm serve` (from its own environment) with the argv built from the config, forwards
SIGINT/SIGTERM to it and exits with its exit code. Either way the server listens on 127.0.0.1
unless `trl.vllm_server_host` (or --host) says otherwise, and answers `GET /health` once ready:
the `ebft` launcher polls that before it starts `python -m ebft_engine train CONFIG`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ebft_engine.config import EbftConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (a preset or your own)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, dotted for nested ones (vllm.backend=hf)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on (default: trl.vllm_server_port; 0 = any free port)")
    parser.add_argument("--host", default=None,
                        help="address to listen on (default: trl.vllm_server_host, else 127.0.0.1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="hf backend: torch CPU threads (default: torch's choice / OMP_NUM_THREADS)")
    parser.add_argument("--print-argv", action="store_true",
                        help="print the server command line and exit (vllm backend)")


def run(args: argparse.Namespace) -> int:
    from ebft_engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, list(args.overrides))
    except ConfigError as error:
        print(f"error: {args.config}: invalid config", file=sys.stderr)
        for problem in getattr(error, "problems", None) or []:
            print(f"  {problem.key}: {problem.message}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from ebft_engine.rollout import vllm_launcher as launcher
    from ebft_engine.rollout.client import ServerError

    host = args.host or launcher.server_bind_host(cfg)
    port = launcher.server_port(cfg) if args.port is None else int(args.port)
    if host in launcher.ALL_INTERFACES:
        print(f"warning: the generation server listens on {host}: it is reachable from the network. "
              "Remove trl.vllm_server_host (or pass --host 127.0.0.1) to listen on loopback only.",
              file=sys.stderr, flush=True)
    _start_watchdog()
    try:
        if cfg.vllm.backend == "hf":
            return _serve_hf(cfg, host, port, threads=args.threads)
        return _serve_vllm(cfg, host, port, print_only=args.print_argv)
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # model loading etc.: one clear line, exit 1
        if type(error).__name__ in ("ModelLoadError",):
            print(f"error: {error}", file=sys.stderr)
            return 1
        raise


def _start_watchdog() -> None:
    try:
        from ebft_engine import watchdog
    except ImportError:  # pragma: no cover - optional module
        return
    start = getattr(watchdog, "start_parent_watchdog", None)
    if start is not None:
        start()


def _serve_hf(cfg: EbftConfig, host: str, port: int, threads: int | None = None) -> int:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from ebft_engine.rollout import vllm_launcher as launcher
    from ebft_engine.rollout.hf_engine import load_state
    from ebft_engine.rollout.hf_server import log, serve

    model_path, gguf_file = launcher.resolve_model_source(cfg)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not threads and "OMP_NUM_THREADS" not in os.environ:
        # the trainer runs beside us on the same cores: take half, not all (oversubscribed
        # OpenMP threads spin and slow both processes down many times over)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    rank = launcher.lora_rank_flag(cfg.lora_r) if launcher.uses_lora(cfg) else 64
    log(f"loading {cfg.base_model} ({model_path}) on {device}, {torch.get_num_threads()} threads")
    state = load_state(model_path, max_model_len=launcher.max_model_len(cfg),
                       dtype=launcher.hf_dtype(cfg), device=device, seed=cfg.seed,
                       max_lora_rank=rank, gguf_file=gguf_file)
    serve(state, host, port)
    return 0


def _serve_vllm(cfg: EbftConfig, host: str, port: int, *, print_only: bool = False) -> int:
    import shlex
    import subprocess

    from ebft_engine.rollout import vllm_launcher as launcher

    if port == 0:
        port = launcher.free_port(host if host not in launcher.ALL_INTERFACES else "127.0.0.1")
    model = launcher.vllm_model_arg(cfg)
    argv = launcher.vllm_serve_argv(cfg, model, port, host)
    if print_only:
        print(shlex.join(argv))
        return 0
    env = launcher.vllm_env(model)
    print(f"$ {shlex.join(argv)}", flush=True)
    print(f"vLLM will listen on {launcher.base_url(host, port)} (GET /health answers once ready)",
          flush=True)
    # Own session: a signal to us is forwarded to vLLM's whole process group (EngineCore included).
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        return proc.wait()
    finally:
        launcher.stop_server(proc, grace_s=15)
