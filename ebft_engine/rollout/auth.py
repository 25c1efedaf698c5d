"""The generation server's per-run token: who may talk to the server (decisions.md §16).

The server can replace the weights it serves, load adapters and stop generating: any local process
that reaches its port could do the same. So every run has a random token. `ebft serve` takes it
from $EBFT_SERVER_TOKEN (the `ebft` launcher generates one per run and hands it to the server and
the trainer through their environments) or makes one, and writes it to `RUN_DIR/server.token`
(mode 0600, created that way, replaced atomically). The trainer takes $EBFT_SERVER_TOKEN, else
that file. The token never goes on a command line (`/proc/PID/cmdline` is world-readable) nor into
a log.

Every route of our server but `GET /health` needs `Authorization: Bearer <token>` (`BearerAuth`);
a wrong or missing token is 401, whatever the route, so an unauthenticated caller learns nothing
about which routes exist. `vllm serve` gets the token as VLLM_API_KEY (docs/security.md says
which of vLLM's routes that covers).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ebft_engine.rollout.protocol import ApiError

TOKEN_ENV = "EBFT_SERVER_TOKEN"
TOKEN_FILE = "server.token"
OPEN_PATHS = frozenset({"/health"})
"""Routes anyone may call: readiness polls by the launcher, which holds no token."""


def new_token() -> str:
    """256 random bits, URL-safe (fits a header and a file)."""
    return secrets.token_urlsafe(32)


def token_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir).expanduser() / TOKEN_FILE


def write_token_file(path: str | os.PathLike[str], token: str) -> Path:
    """`path` holding `token`, created 0600 (never readable by others, not even for a moment)
    and moved into place atomically."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_token_file(path: str | os.PathLike[str]) -> str | None:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def write_token(run_dir: str | os.PathLike[str], token: str) -> Path:
    """`RUN_DIR/server.token` (see write_token_file)."""
    return write_token_file(token_path(run_dir), token)


def read_token(run_dir: str | os.PathLike[str]) -> str | None:
    return read_token_file(token_path(run_dir))


def server_token(run_dir: str | os.PathLike[str]) -> str:
    """The token a server started for this run dir uses: $EBFT_SERVER_TOKEN, else a new one;
    written to `RUN_DIR/server.token` either way."""
    token = os.environ.get(TOKEN_ENV, "").strip() or new_token()
    write_token(run_dir, token)
    return token


def client_token(run_dir: str | os.PathLike[str]) -> str | None:
    """The token the trainer sends: $EBFT_SERVER_TOKEN, else `RUN_DIR/server.token`."""
    return os.environ.get(TOKEN_ENV, "").strip() or read_token(run_dir)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class BearerAuth:
    """ASGI middleware: every request but OPEN_PATHS needs `Authorization: Bearer <token>`
    (compared in constant time); 401 in vLLM's error shape otherwise."""

    def __init__(self, app, token: str):
        if not token:
            raise ValueError("the generation server needs a non-empty token")
        self.app = app
        self._digest = _digest(token)

    def allowed(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(value.strip()), self._digest)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" or (scope["type"] == "http" and scope["path"] in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), "")
        if scope["type"] == "http" and self.allowed(header):
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        error = ApiError(401, "missing or wrong token: send `Authorization: Bearer <token>` with this "
                              "run's token ($EBFT_SERVER_TOKEN, or RUN_DIR/server.token)")
        if scope["type"] != "http":  # a websocket: refuse the handshake
            await send({"type": "websocket.close", "code": 1008})
            return
        await JSONResponse(error.body(), status_code=401,
                           headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
