"""Follow files that other processes append to: `metrics.jsonl`, `trainer.log`, `server.log`.

Non-blocking and poll-based (toolong polls too): the file is opened lazily (it may not exist
yet), read from the last offset, split on newlines, and an incomplete last line waits in a buffer
for the next read (torn writes). If the file shrinks (truncated) or is replaced (new inode), it is
read again from the start. Lines of `metrics.jsonl` that are not JSON objects are skipped and
counted, and so are records whose fields have the wrong type (`events.record_problem`: a string
where a number belongs, a list for `step`...).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator

from ebft_tui.runs.events import record_problem

MAX_READ = 8 * 1024 * 1024  # bytes per read_new() call, so a huge backlog cannot stall a UI frame


class _LineFollower:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = None
        self._ino: int | None = None
        self._offset = 0
        self._buf = b""
        self.n_resets = 0  # truncations / replacements seen

    @property
    def offset(self) -> int:
        return self._offset

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def _reset(self) -> None:
        self.close()
        self._offset = 0
        self._buf = b""
        self._ino = None

    def _raw_lines(self) -> list[bytes]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._f is not None:
                self._reset()
            return []
        if self._f is not None and (st.st_ino != self._ino or st.st_size < self._offset):
            self._reset()
            self.n_resets += 1
        if self._f is None:
            try:
                self._f = open(self.path, "rb")
            except FileNotFoundError:
                return []
            self._ino = os.fstat(self._f.fileno()).st_ino
            self._f.seek(self._offset)
        if st.st_size == self._offset:
            return []
        data = self._f.read(MAX_READ)
        if not data:
            return []
        self._offset += len(data)
        data = self._buf + data
        *lines, self._buf = data.split(b"\n")
        return lines

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlFollower(_LineFollower):
    """`read_new()` returns the complete new records (dicts); `n_invalid` counts skipped lines."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.n_invalid = 0

    def read_new(self) -> list[dict[str, Any]]:
        out = []
        for raw in self._raw_lines():
            raw = raw.strip()
            if not raw:
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.n_invalid += 1
                continue
            if record_problem(rec) is None:
                out.append(rec)
            else:
                self.n_invalid += 1
        return out


class TextFollower(_LineFollower):
    """`read_new()` returns the complete new lines of a text log (decoded, without the newline)."""

    def read_new(self) -> list[str]:
        return [raw.decode("utf-8", errors="replace").rstrip("\r") for raw in self._raw_lines()]


async def _follow(follower, poll_s: float, stop_event: asyncio.Event | None) -> AsyncIterator[list]:
    try:
        while True:
            items = follower.read_new()
            if items:
                yield items
            if stop_event is not None and stop_event.is_set():
                items = follower.read_new()
                if items:
                    yield items
                return
            if stop_event is None:
                await asyncio.sleep(poll_s)
            else:
                try:
                    await asyncio.wait_for(stop_event.wait(), poll_s)
                except asyncio.TimeoutError:
                    pass
    finally:
        follower.close()


def follow_jsonl(
    path: str | Path, poll_s: float = 0.2, stop_event: asyncio.Event | None = None
) -> AsyncIterator[list[dict[str, Any]]]:
    """Yield lists of new records until `stop_event` is set (then a last drain)."""
    return _follow(JsonlFollower(path), poll_s, stop_event)


def follow_text(
    path: str | Path, poll_s: float = 0.2, stop_event: asyncio.Event | None = None
) -> AsyncIterator[list[str]]:
    return _follow(TextFollower(path), poll_s, stop_event)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file ([] when it does not exist)."""
    with JsonlFollower(path) as f:
        out: list[dict[str, Any]] = []
        while True:
            out.extend(f.read_new())
            try:
                if f.offset >= os.path.getsize(f.path):
                    return out
            except OSError:
                return out


def tail_lines(path: str | Path, n: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `n` lines of a text file ([] when missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # probably cut in the middle
    return list(deque((ln.rstrip("\r") for ln in lines), maxlen=n))
