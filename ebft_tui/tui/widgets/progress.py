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

    eta_text = ""

    def compose(self) -> ComposeResult:
        yield Static("waiting for the first step", classes="progress-text", id="progress-step")
        yield ProgressBar(total=None, show_eta=False, show_percentage=True)
        yield Static("", classes="progress-text", id="progress-eta")

    def show(self, step: int | None, max_steps: int | None, eta_seconds: float | None,
             phase: str | None, phase_elapsed: float | None = None, phase_step: int | None = None) -> None:
        """`step 3/20 [bar] ETA 4:10 · generating step 4 · 0:37`: the phase within a step and how
        long it has been going, so a long CPU step does not look hung."""
        bar = self.query_one(ProgressBar)
        if max_steps:
            bar.update(total=max_steps, progress=step or 0)
        text = f"step {step if step is not None else '-'}/{max_steps or '?'}"
        self.query_one("#progress-step", Static).update(text)
        tail = f"ETA {format_duration(eta_seconds)}" if eta_seconds is not None or phase_elapsed is not None \
            or not phase else ""
        if phase:
            what = phase
            if phase_step is not None and phase in ("generating", "scoring", "training") and phase_step != step:
                what = f"{phase} step {phase_step}"
            if phase_elapsed is not None:
                what = f"{what} · {format_duration(phase_elapsed)}"
            tail = f"{tail} · {what}" if tail else what
        self.eta_text = tail
        self.query_one("#progress-eta", Static).update(tail)

    @property
    def text(self) -> str:
        return str(self.query_one("#progress-step", Static).content)
