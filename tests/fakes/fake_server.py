"""A fake generation server: `GET /health` answers 503 for N polls, then 200.

    python tests/fakes/fake_server.py --port P [--unhealthy-polls N] [--never-healthy]
        [--exit-early CODE] [--ignore-sigterm] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _watchdog  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--unhealthy-polls", type=int, default=0)
    ap.add_argument("--never-healthy", action="store_true")
    ap.add_argument("--exit-early", type=int, default=None, help="print an error and exit with this code")
    ap.add_argument("--ignore-sigterm", action="store_true")
    ap.add_argument("--report", default=None)
    ap.add_argument("--no-watchdog", action="store_true", help="leave launcher death to the lifeline alone")
    args = ap.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not args.no_watchdog:
        _watchdog.start()
    print(f"fake server loading on port {args.port}", flush=True)
    if args.report:
        Path(args.report).write_text(json.dumps({
            "pid": os.getpid(), "pgid": os.getpgrp(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "EBFT_"))},
        }))
    if args.exit_early is not None:
        time.sleep(0.2)
        print("fake server: CUDA out of memory while loading the model", flush=True)
        return args.exit_early

    polls = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") != "/health":
                self.send_response(404)
                self.end_headers()
                return
            polls["n"] += 1
            ok = not args.never_healthy and polls["n"] > args.unhealthy_polls
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b"ok" if ok else b"loading")

        def log_message(self, fmt, *a):
            print("fake server: " + fmt % a, flush=True)

    HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
