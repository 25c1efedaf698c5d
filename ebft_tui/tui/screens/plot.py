"""One metric full-screen: the plot with its step axis, and the numbers beside it.

Opened from a metric card (Enter or a click) on the run screen, and by the runs screen's compare
(two runs, one plot per metric; `[` / `]` or ←/→ change the metric).
"""

from __future__ import annotations

from typing import Callable, Sequence

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from ebft_tui.catalog import METRICS, healthy_range
from ebft_tui.tui.widgets.metric_card import range_text
from ebft_tui.tui.widgets.metric_plot import MetricPlot, PlotSeries


def stats_line(key: str, series: Sequence[PlotSeries]) -> str:
    spec = METRICS.get(key)
    fmt = spec.format if spec else (lambda v: f"{v:.4g}")
    parts = []
    for s in series:
        if not s.values:
            parts.append(f"{s.label}: no values")
            continue
        parts.append(f"{s.label}: last {fmt(s.values[-1])} at step {s.steps[-1]:g} · min {fmt(min(s.values))} · "
                     f"max {fmt(max(s.values))} · {len(s.values)} points")
    rng = range_text(healthy_range(key)) if spec else ""
    if rng:
        parts.append(f"healthy {rng}")
    return "\n".join(parts)


class PlotScreen(Screen):
    """`series_for(key)` gives the series to draw for a metric key; `keys` are the ones to page."""

    DEFAULT_CSS = """
    PlotScreen MetricPlot { height: 1fr; }
    PlotScreen #plot-stats { height: auto; padding: 0 1; color: $text-muted; }
    """

    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "Back"),
        Binding("right,right_square_bracket", "page(1)", "Next metric"),
        Binding("left,left_square_bracket", "page(-1)", "Previous metric"),
    ]

    def __init__(self, key: str, series_for: Callable[[str], list[PlotSeries]], keys: Sequence[str] = (),
                 subtitle: str = "") -> None:
        super().__init__()
        self.key = key
        self.series_for = series_for
        self.keys = list(keys) or [key]
        self.subtitle = subtitle

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield MetricPlot(id="plot")
        yield Static("", id="plot-stats")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "ebft-tui"
        self.redraw()

    def redraw(self) -> None:
        spec = METRICS.get(self.key)
        label = spec.label if spec else self.key
        want = f" (want {'↑' if spec.desired == 'up' else '↓'})" if spec and spec.desired else ""
        self.sub_title = f"{label}{want}" + (f" · {self.subtitle}" if self.subtitle else "")
        series = self.series_for(self.key)
        self.query_one(MetricPlot).show(series, title=f"{label}{want}", ylabel=self.key)
        self.query_one("#plot-stats", Static).update(stats_line(self.key, series))

    def action_page(self, delta: int) -> None:
        if self.key in self.keys:
            self.key = self.keys[(self.keys.index(self.key) + delta) % len(self.keys)]
        else:
            self.key = self.keys[0]
        self.redraw()

    def refresh_data(self) -> None:
        """The run goes on: redraw with what the history has now."""
        self.redraw()


