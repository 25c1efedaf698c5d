"""Step progress of the run: a bar, `step N/M`, ETA and the trainer's current phase."""

from __future__ import annotations


from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import ProgressBar, Static

from ebft_tui.metrics.history import format_duration


class RunProgress(Horizontal):
    """`show(step, max_steps, eta_seconds, phase)` re-renders it."""

    DEFAULT_CSS = """
    RunProgress { height: 1; }
    RunProgress ProgressBar { width: 1fr; }
    RunProgress ProgressBar Bar { width: 1fr; }
    RunProgress .progress-text { width: auto; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static("waiting for the first step", classes="progress-text", id="progress-step")
        yield ProgressBar(total=None, show_eta=False, show_percentage=True)
        yield Static("", classes="progress-text", id="progress-eta")

    def show(self, step: int | None, max_steps: int | None, eta_seconds: float | None,
             phase: str | None) -> None:
        bar = self.query_one(ProgressBar)
        if max_steps:
            bar.update(total=max_steps, progress=step or 0)
        text = f"step {step if step is not None else '-'}/{max_steps or '?'}"
        self.query_one("#progress-step", Static).update(text)
        tail = f"ETA {format_duration(eta_seconds)}"
        if phase:
            tail = f"{tail} · {phase}"
        self.query_one("#progress-eta", Static).update(tail)

    @property
    def text(self) -> str:
        return str(self.query_one("#progress-step", Static).content)
