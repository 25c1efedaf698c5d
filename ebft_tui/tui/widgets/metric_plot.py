"""A metric's history as a real plot: optimizer step on x, value on y (textual-plotext).

Sparklines drew one point as a full-width bar and the lowest of three values as a blank; a plot
has axes with numbers, draws a lone point as a marker, and can carry two runs for a comparison.
Values are finite only (the history counts NaN/inf apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from textual_plotext import PlotextPlot

COLORS = ("cyan", "orange", "green", "magenta")


@dataclass
class PlotSeries:
    label: str
    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def series_from(label: str, series: Any) -> PlotSeries:
    """A `MetricSeries` (values + steps, finite only) as plot data; a missing step is its index."""
    values = [float(v) for v in getattr(series, "values", ()) or ()]
    raw_steps = list(getattr(series, "steps", ()) or ())
    steps = [float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else float(i + 1)
             for i, s in enumerate(raw_steps[: len(values)])]
    steps += [float(i + 1) for i in range(len(steps), len(values))]
    keep = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return PlotSeries(label, [s for s, _ in keep], [v for _, v in keep])


def padded_range(lo: float, hi: float) -> tuple[float, float]:
    """A y (or x) range that shows a flat line or a single point in the middle, not on an edge."""
    if hi > lo:
        pad = (hi - lo) * 0.08
        return lo - pad, hi + pad
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def step_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Whole-number step ticks: every step when there are few, else `most` evenly spread."""
    lo_i, hi_i = int(math.floor(lo)), int(math.ceil(hi))
    if hi_i - lo_i < most:
        return [float(t) for t in range(lo_i, hi_i + 1)]
    span = hi_i - lo_i
    return sorted({float(round(lo_i + span * i / (most - 1))) for i in range(most)})


class MetricPlot(PlotextPlot):
    """`show(series_list, title=..., ylabel=...)` redraws it; `compact` drops the axis labels."""

    DEFAULT_CSS = """
    MetricPlot { height: 1fr; min-height: 3; }
    """

    def __init__(self, *, compact: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compact = compact
        self.series: list[PlotSeries] = []
        self.plot_title = ""
        self.ylabel = ""

    def on_mount(self) -> None:
        super().on_mount()
        self.replot()

    def show(self, series: Sequence[PlotSeries], title: str = "", ylabel: str = "") -> None:
        self.series = [s for s in series if s.values]
        self.plot_title, self.ylabel = title, ylabel
        self.replot()

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        if not self.series:
            plt.title("no values yet")
            self.refresh()
            return
        xs = [x for s in self.series for x in s.steps]
        ys = [y for s in self.series for y in s.values]
        for i, s in enumerate(self.series):
            color = COLORS[i % len(COLORS)]
            label = s.label if len(self.series) > 1 else None
            if len(s.values) == 1:
                plt.scatter(s.steps, s.values, marker="●", color=color, label=label)
            else:
                plt.plot(s.steps, s.values, marker="braille", color=color, label=label)
        plt.xlim(*padded_range(min(xs), max(xs)))
        ticks = step_ticks(min(xs), max(xs))
        plt.xticks(ticks, [f"{t:g}" for t in ticks])
        plt.ylim(*padded_range(min(ys), max(ys)))
        if not self.compact:
            plt.xlabel("step")
            if self.ylabel:
                plt.ylabel(self.ylabel)
        if self.plot_title:
            plt.title(self.plot_title)
        self.refresh()

    def text_lines(self) -> list[str]:
        """What the plot shows, as plain text (tests, screenshots in text)."""
        return [self.render_line(y).text for y in range(self.size.height)]
