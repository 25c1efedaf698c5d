"""A child's log (trainer.log / server.log) as it grows: a bounded `Log` that follows the end."""

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
