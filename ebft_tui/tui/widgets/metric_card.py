"""One metric of the run: label, last value, trend arrow, a step/value plot, min/max and NaN count.

The card renders what `MetricHistory` computed (series, trend, health); it keeps no history of its
own. Colours: the value and the card's border follow the spec's healthy range (green good, yellow
warn, red bad); the arrow is green when the metric moves the way the spec wants it to, red when it
moves the other way.
"""

from __future__ import annotations

import math
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Static

from ebft_tui.tui.widgets.metric_plot import MetricPlot, series_from

ARROWS = {1: "↑", -1: "↓", 0: "→"}
ASCII_ARROWS = {1: "^", -1: "v", 0: "="}
HEALTH_CLASSES = ("-good", "-warn", "-bad", "-unknown")


def trend_sign(trend: Any) -> int | None:
    """Normalise a trend (a number, or 'up'/'down'/'flat') to 1, -1, 0; None when there is none."""
    if trend is None:
        return None
    if isinstance(trend, str):
        return {"up": 1, "down": -1, "flat": 0, "^": 1, "v": -1, "=": 0}.get(trend.lower())
    if isinstance(trend, (int, float)) and math.isfinite(trend):
        return (trend > 0) - (trend < 0)
    return None


def desired_sign(desired: Any) -> int:
    """The direction the spec wants a metric to move: 1 up, -1 down, 0 no preference."""
    return trend_sign(desired) or 0


def health_class(health: Any) -> str:
    """CSS class for a health verdict ('good' / 'warn' / 'bad'); anything else is unknown."""
    name = getattr(health, "value", health)
    name = str(name).lower() if name is not None else ""
    return f"-{name}" if f"-{name}" in HEALTH_CLASSES else "-unknown"


def range_text(healthy: tuple[float, float] | None) -> str:
    """`0.3–0.9`, `above 0.1` (an infinite bound), or '' without a range."""
    if not healthy:
        return ""
    lo, hi = (None if v is None or math.isinf(v) else v for v in healthy)
    if lo is not None and hi is not None:
        return f"{lo:g}–{hi:g}"
    return f"above {lo:g}" if lo is not None else (f"below {hi:g}" if hi is not None else "")


def finite(values: Any) -> list[float]:
    """Only the finite numbers: `Sparkline` raises on NaN or inf."""
    out: list[float] = []
    for v in values or ():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


class MetricCard(Vertical, can_focus=True):
    """A card for one `MetricSpec`; call `show(series, health)` with fresh state. Enter (or a
    click) posts `MetricCard.Open`: the screen shows the metric full-screen."""

    BINDINGS = [Binding("enter", "open", "Open plot")]

    class Open(Message):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

    DEFAULT_CSS = """
    MetricCard {
        height: 1fr;
        min-height: 7;
        border: round $panel-lighten-2;
        border-title-color: $text;
        padding: 0 1;
    }
    MetricCard:focus { background-tint: $foreground 8%; }
    MetricCard.-good { border: round $success; }
    MetricCard.-warn { border: round $warning; }
    MetricCard.-bad { border: round $error; }
    MetricCard .card-value { text-style: bold; width: 1fr; }
    MetricCard .card-arrow { width: 3; text-align: right; text-style: bold; }
    MetricCard .card-row { height: 1; }
    MetricCard.-good .card-value { color: $success; }
    MetricCard.-warn .card-value { color: $warning; }
    MetricCard.-bad .card-value { color: $error; }
    MetricCard .card-arrow.-with { color: $success; }
    MetricCard .card-arrow.-against { color: $error; }
    MetricCard .card-arrow.-flat { color: $text-muted; }
    MetricCard MetricPlot { height: 1fr; min-height: 3; margin: 0; }
    MetricCard .card-foot { color: $text-muted; height: 2; }
    MetricCard.-compact { min-height: 4; }
    MetricCard.-compact MetricPlot { display: none; }
    MetricCard.-compact .card-foot { height: 1; }
    """

    def __init__(self, spec: Any, *, ascii_only: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.ascii_only = ascii_only
        self.last: float | None = None
        self.arrow: str = ""
        self.health: str = "-unknown"
        self.values: list[float] = []
        self.series: Any = None
        want = desired_sign(getattr(spec, "desired", None))
        arrows = ASCII_ARROWS if ascii_only else ARROWS
        self.border_title = spec.label + (f" (want {arrows[want]})" if want else "")
        self.add_class("-unknown")

    def compose(self) -> ComposeResult:
        with Horizontal(classes="card-row"):
            yield Static("—", classes="card-value")
            yield Static("", classes="card-arrow")
        yield MetricPlot(compact=True)
        yield Static("\n" + self._healthy_text(), classes="card-foot")

    def _healthy_text(self) -> str:
        text = range_text(getattr(self.spec, "healthy", None))
        return f"healthy {text}" if text else ""

    def show(self, series: Any, health: Any = None) -> None:
        """Render a `MetricSeries` (last, values, trend(), n_nonfinite) and a health verdict."""
        if series is None:
            return
        values = finite(getattr(series, "values", ()))
        last = getattr(series, "last", None)
        self.last = last
        shown = getattr(series, "last_raw", last)  # a NaN last value shows as nan, not the one before
        self.query_one(".card-value", Static).update("—" if shown is None else self.spec.format(shown))

        sign = trend_sign(series.trend() if callable(getattr(series, "trend", None)) else None)
        arrows = ASCII_ARROWS if self.ascii_only else ARROWS
        self.arrow = arrows[sign] if sign is not None else ""
        arrow = self.query_one(".card-arrow", Static)
        arrow.update(self.arrow)
        want = desired_sign(getattr(self.spec, "desired", None))
        arrow.set_class(sign is not None and want != 0 and sign == want, "-with")
        arrow.set_class(sign is not None and want != 0 and sign == -want, "-against")
        arrow.set_class(sign is not None and (sign == 0 or want == 0), "-flat")

        self.health = health_class(health)
        for cls in HEALTH_CLASSES:
            self.set_class(cls == self.health, cls)

        self.values = values
        if not self.has_class("-compact"):
            self.query_one(MetricPlot).show([series_from(self.spec.label, series)])
        self.series = series
        stats = []
        if values:
            stats.append(f"min {self.spec.format(min(values))} · max {self.spec.format(max(values))}")
        n_bad = getattr(series, "n_nonfinite", 0) or 0
        if n_bad:
            stats.append(f"{n_bad} NaN")
        foot = [" · ".join(stats), self._healthy_text()]
        if self.has_class("-compact"):  # one short line: the range seen so far, and NaNs
            short = [f"{self.spec.format(min(values))}…{self.spec.format(max(values))}"] if values else []
            foot = [" · ".join(short + ([f"{n_bad} NaN"] if n_bad else []))]
        self.query_one(".card-foot", Static).update("\n".join(foot))

    def set_compact(self, compact: bool) -> None:
        self.set_class(compact, "-compact")
        if not compact and self.series is not None:
            self.query_one(MetricPlot).show([series_from(self.spec.label, self.series)])

    def action_open(self) -> None:
        self.post_message(self.Open(self.spec.key))

    def on_click(self) -> None:
        self.post_message(self.Open(self.spec.key))
