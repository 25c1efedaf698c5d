"""What one request to our generation server may ask, and which files it may make the server read.

Behind the token (auth.py) the server still trusts nothing a request says:
- caps per request (`RequestLimits`, from the config's `vllm.max_*_per_request` and
  `vllm.max_request_mb`): samples per prompt, prompts, tokens per sample, body size. Over a cap
  is 400 (413 for the body) with a message naming the cap and its config key; the body is
  refused before it is read whole (`BodyLimit`);
- file-loading routes (a LoRA adapter's folder, a weights folder to reload) read only inside one
  folder, the run dir (`loadable_path`): the path is resolved first (symlinks, `..`), and
  anything outside is 403 with one message, whether or not the path exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ebft_engine.config import EbftConfig, VllmSection
from ebft_engine.rollout.protocol import ApiError

MIB = 1024 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """Caps on one request. `max_tokens` None: only max_model_len bounds a sample."""

    max_n: int
    max_prompts: int
    max_tokens: int | None
    max_body_bytes: int

    @classmethod
    def from_section(cls, vllm: VllmSection, max_completion_length: int | None = None) -> "RequestLimits":
        return cls(max_n=vllm.max_n_per_request, max_prompts=vllm.max_prompts_per_request,
                   max_tokens=vllm.max_tokens_per_request or max_completion_length,
                   max_body_bytes=int(vllm.max_request_mb * MIB))

    @classmethod
    def from_config(cls, cfg: EbftConfig) -> "RequestLimits":
        """The run's caps; unset `vllm.max_tokens_per_request` = `trl.max_completion_length`."""
        return cls.from_section(cfg.vllm, cfg.trl.max_completion_length)

    @classmethod
    def defaults(cls) -> "RequestLimits":
        """The schema's defaults (a server started without a config)."""
        return cls.from_section(VllmSection())

    def check(self, n_prompts: int, n: int, max_tokens: int) -> None:
        """400 naming the first cap a completion request is over."""
        for value, cap, what, key, param in (
                (n, self.max_n, "n (samples per prompt)", "max_n_per_request", "n"),
                (n_prompts, self.max_prompts, "prompts", "max_prompts_per_request", "prompt"),
                (max_tokens, self.max_tokens, "max_tokens", "max_tokens_per_request", "max_tokens")):
            if cap is not None and value > cap:
                raise ApiError(400, f"{what} = {value} is above this server's limit of {cap} per "
                                    f"request (vllm.{key} in the run's config).", param)


def loadable_path(path: object, root: Path | None, what: str) -> Path:
    """`path` resolved (symlinks followed, `..` removed) when it lies inside `root`; 403 otherwise
    with the same answer whether or not it exists (a token holder learns nothing about the rest of
    the disk)."""
    if not isinstance(path, str) or not path:
        raise ApiError(400, f"{what} must be a non-empty string (a folder inside the run dir)", what)
    refused = ApiError(403, f"{what} is not inside the folder this server may load files from "
                            f"({root if root is not None else 'none: started without --load-root'}).", what)
    if root is None:
        raise refused
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise refused from None
    if resolved != root and not resolved.is_relative_to(root):
        raise refused
    return resolved


class BodyLimit:
    """ASGI middleware: a request body larger than `max_bytes` is refused with 413, by its
    Content-Length before it is read, or while it streams in when it has none."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of "
                             f"{self.max_bytes / MIB:g} MiB (vllm.max_request_mb in the run's config).")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            from fastapi.responses import JSONResponse

            error = self._too_large() if length.isdigit() else ApiError(400, "bad Content-Length")
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()  # answered by the app's ApiError handler
            return message

        await self.app(scope, counted, send)
