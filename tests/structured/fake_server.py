"""A tiny stand-in generation server (stdlib http.server) for failure and bookkeeping tests.

    python fake_server.py --mode MODE --port-file F [--record R]

Modes:
  ok          valid vLLM-shaped completions: sample j of a prompt is [40 + j, 41 + j, END]
              (log-prob -1.0 each); adapters load/unload and are listed; requests are recorded
  malformed   /health ok, completions answer 200 with one log-prob missing
  die         /health ok, the first completion request kills the process mid-request
  error500    /health ok, completions answer 500 with a vLLM error body
  hang        /health ok, completions never answer
Every request body is appended to --record as a JSON line (path, body, time).
--same makes the n samples identical.
--server-info JSON: what GET /server_info answers as `vllm_config` (default: no such route).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

END = 6


class Handler(BaseHTTPRequestHandler):
    mode = "ok"
    record = None
    same = False
    server_info = None
    adapters: dict[str, str] = {}
    lock = threading.Lock()

    def log_message(self, fmt, *args):  # to stdout = the server log
        print("fake-server " + fmt % args, flush=True)

    def _send(self, status: int, payload, content_type="application/json"):
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, "", "text/plain")
        if self.path.split("?")[0] == "/server_info" and self.server_info is not None:
            return self._send(200, {"vllm_config": self.server_info})
        if self.path == "/v1/models":
            data = [{"id": "ebft-base", "parent": None, "max_model_len": 512}]
            data += [{"id": k, "parent": "ebft-base"} for k in self.adapters]
            return self._send(200, {"object": "list", "data": data})
        return self._send(404, {"error": {"message": "no route", "code": 404}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.record:
            with self.lock, open(self.record, "a") as f:
                f.write(json.dumps({"path": self.path, "body": body, "t": time.time()}) + "\n")
        if self.path == "/v1/load_lora_adapter":
            self.adapters[body["lora_name"]] = body["lora_path"]
            print(f"load_lora_adapter name={body['lora_name']}", flush=True)
            return self._send(200, "Success", "text/plain")
        if self.path == "/v1/unload_lora_adapter":
            self.adapters.pop(body["lora_name"], None)
            print(f"unload_lora_adapter name={body['lora_name']}", flush=True)
            return self._send(200, "Success", "text/plain")
        if self.path != "/v1/completions":
            return self._send(200, {})
        if self.mode == "die":
            os._exit(3)
        if self.mode == "hang":
            time.sleep(3600)
        if self.mode == "error500":
            return self._send(500, {"error": {"message": "engine exploded (fake)",
                                              "type": "InternalServerError", "code": 500}})
        prompts = body["prompt"]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        n, mt = int(body.get("n", 1)), int(body.get("max_tokens", 16))
        choices = []
        for p in prompts:
            for j in range(n):
                k = 0 if self.same else j
                ids = [40 + k, 41 + k, END][: max(1, mt)]
                lps = [-1.0] * len(ids)
                if self.mode == "malformed":
                    lps = lps[:-1]
                choices.append({"index": len(choices), "text": "", "prompt_token_ids": p,
                                "token_ids": ids,
                                "finish_reason": "stop" if ids[-1] == END else "length",
                                "logprobs": {"tokens": [f"token_id:{t}" for t in ids],
                                             "token_logprobs": lps}})
        return self._send(200, {"model": body.get("model"), "choices": choices})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="ok")
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--record", default=None)
    ap.add_argument("--same", action="store_true", help="all n samples of a prompt identical")
    ap.add_argument("--server-info", default=None, help="JSON for GET /server_info's vllm_config")
    args = ap.parse_args()
    Handler.server_info = json.loads(args.server_info) if args.server_info else None
    Handler.mode, Handler.record = args.mode, args.record
    Handler.same = args.same
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    print(f"fake server ({args.mode}) on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
