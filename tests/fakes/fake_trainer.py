"""A fake trainer: writes OUT/metrics.jsonl like the engine (docs/log-contract.md), with knobs.

    python tests/fakes/fake_trainer.py --out DIR [--steps 5] [--interval 0.05] [--torn]
        [--nan-at K] [--crash-after K] [--exit-code C] [--ignore-sigterm] [--grandchild]
        [--grandchild-ignores-term] [--report FILE] [--hang] [--graceful] [--phases] [--no-watchdog]
        [--bad-records]

--graceful behaves like the engine on SIGTERM: finish the step in progress, write a checkpoint and
a `stopped` status, exit 143. --phases writes `phase` records (generating, scoring, training)
within each step. --no-watchdog leaves launcher death to the lifeline alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _watchdog  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--torn", action="store_true", help="write each record in two halves")
    ap.add_argument("--nan-at", type=int, default=None)
    ap.add_argument("--crash-after", type=int, default=None, help="exit with --exit-code after step K")
    ap.add_argument("--exit-code", type=int, default=3)
    ap.add_argument("--ignore-sigterm", action="store_true")
    ap.add_argument("--grandchild", action="store_true", help="spawn a sleeping grandchild")
    ap.add_argument("--grandchild-ignores-term", action="store_true")
    ap.add_argument("--report", default=None, help="write pid/pgid/stdin/env/grandchild pid here (JSON)")
    ap.add_argument("--hang", action="store_true", help="after the steps, sleep until killed")
    ap.add_argument("--warning-at", type=int, default=None)
    ap.add_argument("--graceful", action="store_true")
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--no-watchdog", action="store_true")
    ap.add_argument("--bad-records", action="store_true", help="also write records with wrongly typed fields")
    args = ap.parse_args()

    stop = {"asked": False}
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif args.graceful:
        def on_term(signum, frame):
            stop["asked"] = True
            print("SIGTERM: stopping after this step (checkpoint, then exit)", flush=True)
        signal.signal(signal.SIGTERM, on_term)
    if not args.no_watchdog:
        _watchdog.start()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    grandchild = None
    if args.grandchild:
        code = "import signal, time\n"
        if args.grandchild_ignores_term:
            code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        code += "time.sleep(600)\n"
        grandchild = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)

    if args.report:
        report = {
            "pid": os.getpid(),
            "pgid": os.getpgrp(),
            "sid": os.getsid(0),
            "stdin": os.readlink("/proc/self/fd/0") if os.path.exists("/proc/self/fd/0") else None,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "EBFT_", "PYTHONUNBUFFERED"))},
            "grandchild": grandchild.pid if grandchild else None,
        }
        tmp = Path(args.report + ".tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, args.report)

    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def write(rec: dict) -> None:
        line = json.dumps({"v": 1, "ts": time.time(), **rec}) + "\n"
        if args.torn:
            half = len(line) // 2
            metrics.write(line[:half])
            metrics.flush()
            time.sleep(min(0.02, args.interval / 2))
            metrics.write(line[half:])
        else:
            metrics.write(line)
        metrics.flush()

    write({"event": "run", "mode": "strided", "max_steps": args.steps, "base_model": "fake", "output_dir": str(out)})
    write({"event": "status", "phase": "training", "step": 0, "message": "fake training"})
    print("fake trainer started", flush=True)
    for step in range(1, args.steps + 1):
        if args.phases:
            for phase in ("generating", "scoring", "training"):
                write({"event": "phase", "phase": phase, "step": step})
                time.sleep(args.interval / 3)
        else:
            time.sleep(args.interval)
        align = 0.2 + 0.05 * step
        rec = {
            "event": "metrics", "step": step, "max_steps": args.steps,
            "ebft/alignment": align, "ebft/diversity": 0.05 - 0.001 * step,
            "ebft/cfm_loss": 5.0 - 0.1 * step, "ebft/reward": align - 0.05, "grad_norm": 1.0 + 0.01 * step,
            "entropy": 0.3, "lr": 1e-5, "step_time_s": args.interval,
        }
        if args.nan_at == step:
            rec["ebft/cfm_loss"] = None
        write(rec)
        if args.bad_records:
            write({"event": "metrics", "step": [step], "ebft/alignment": 9.0})
            write({"event": "metrics", "step": step, "ebft/alignment": "high"})
        if args.warning_at == step:
            write({"event": "warning", "step": step, "metric": "ebft/alignment",
                   "message": "alignment stays below 0.1", "hint": "Try different feature_layers"})
        print(f"step {step}/{args.steps} | align {align:+.3f}", flush=True)
        if args.crash_after == step:
            write({"event": "error", "step": step, "message": "fake crash", "hint": "none"})
            print("fake trainer crashing", file=sys.stderr, flush=True)
            return args.exit_code
        if stop["asked"]:
            write({"event": "status", "phase": "checkpoint", "step": step, "message": "saving"})
            write({"event": "checkpoint", "step": step, "path": f"checkpoints/step-{step:06d}"})
            write({"event": "status", "phase": "stopped", "step": step, "message": "stopped by SIGTERM"})
            print(f"stopped at step {step}", flush=True)
            return 128 + signal.SIGTERM
    write({"event": "status", "phase": "done", "step": args.steps, "message": "finished"})
    if args.hang:
        while not stop["asked"]:
            time.sleep(0.1)
        write({"event": "status", "phase": "stopped", "step": args.steps, "message": "stopped by SIGTERM"})
        return 128 + signal.SIGTERM
    if grandchild is not None:
        grandchild.terminate()
        grandchild.wait()
    return 0


if __name__ == "__main__":
    rc = main()
    sys.exit(rc)
