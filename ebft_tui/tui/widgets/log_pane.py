"""A child's log (trainer.log / server.log) as it grows: a bounded `Log` that follows the end.

Long lines scroll horizontally (a wrapped traceback is harder to read than a wide one);
`find_next` searches, pauses following and scrolls the match into view."""

from __future__ import annotations

from typing import Any, Iterable

from textual.widgets import Log

MAX_LINES = 5000


class LogPane(Log):
    """Shows the newest lines of one log file; the follower feeds it with `add_lines`."""

    DEFAULT_CSS = """
    LogPane { height: 1fr; border: none; }
    """

    def __init__(self, source: str, **kwargs: Any) -> None:
        super().__init__(max_lines=MAX_LINES, auto_scroll=True, highlight=False, **kwargs)
        self.source = source
        self.total_lines = 0
        self._last_match: int | None = None

    def add_lines(self, lines: Iterable[str]) -> None:
        lines = [line.rstrip("\n") for line in lines]
        if lines:
            self.total_lines += len(lines)
            self.write_lines(lines)

    def toggle_follow(self) -> bool:
        self.auto_scroll = not self.auto_scroll
        if self.auto_scroll:
            self.scroll_end(animate=False)
        return self.auto_scroll

    def find_next(self, text: str) -> tuple[int, int] | None:
        """Scroll to the next line (after the last match, wrapping) containing `text`, ignoring
        case; (line index, number of matching lines), or None when no line has it."""
        needle = text.lower()
        lines = list(self.lines)
        hits = [i for i, line in enumerate(lines) if needle in line.lower()]
        if not hits:
            return None
        after = self._last_match if self._last_match is not None else -1
        index = next((i for i in hits if i > after), hits[0])
        self._last_match = index
        self.auto_scroll = False
        self.scroll_to(y=max(0, index - self.size.height // 2), animate=False)
        return index, len(hits)
