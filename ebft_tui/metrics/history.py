"""`MetricHistory`: everything `metrics.jsonl` has said so far, as plain Python.

Widgets (TUI) and the headless printer only render it; trend and health rules live here so they
are unit-testable. Series keep finite values only (Textual's Sparkline raises on NaN/inf) and
count the dropped ones (a NaN is itself a signal).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable, Literal

from ebft_tui.catalog import CONSOLE_KEYS, METRICS, bad_range, healthy_range

Trend = Literal["up", "down", "flat"]
Health = Literal["good", "warn", "bad", "unknown"]

# Keys of a metrics record that are bookkeeping, not series.
_NOT_SERIES = {"v", "ts", "event", "step", "max_steps", "message", "hint", "phase", "path", "adapter", "metric"}
ARROWS = {"up": "^", "down": "v", "flat": "="}


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


class MetricSeries:
    """A bounded series of finite values (with their steps), plus all-time last/min/max."""

    def __init__(self, key: str, maxlen: int = 600):
        self.key = key
        self.values: deque[float] = deque(maxlen=maxlen)
        self.steps: deque[int | None] = deque(maxlen=maxlen)
        self.n_nonfinite = 0
        self.n_total = 0
        self.min: float | None = None
        self.max: float | None = None
        self.last_raw: float | None = None  # the last value as logged, NaN/None included

    def add(self, value: Any, step: int | None = None) -> bool:
        """Append one logged value (None/NaN/inf are counted, not stored). True if stored."""
        self.n_total += 1
        f = _as_float(value)
        self.last_raw = f if f is not None else math.nan
        if f is None or not math.isfinite(f):
            self.n_nonfinite += 1
            return False
        self.values.append(f)
        self.steps.append(step)
        self.min = f if self.min is None else min(self.min, f)
        self.max = f if self.max is None else max(self.max, f)
        return True

    def __len__(self) -> int:
        return len(self.values)

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None

    @property
    def last_is_finite(self) -> bool:
        return self.last_raw is not None and math.isfinite(self.last_raw)

    def trend(self, k: int = 5, tolerance: float = 0.1) -> Trend | None:
        """Mean of the last k values against the k before (fewer when the series is short).

        "flat" when the difference is within `tolerance` x the spread of that window; None with
        fewer than two values.
        """
        n = len(self.values)
        if n < 2:
            return None
        k = max(1, min(k, n // 2))
        vals = list(self.values)[-2 * k:]
        prev, cur = vals[:k], vals[k:]
        diff = sum(cur) / len(cur) - sum(prev) / len(prev)
        spread = max(vals) - min(vals)
        if spread == 0 or abs(diff) <= tolerance * spread:
            return "flat"
        return "up" if diff > 0 else "down"

    def arrow(self) -> str:
        t = self.trend()
        return ARROWS.get(t, " ") if t else " "


class MetricHistory:
    """Fold log records (any event of docs/log-contract.md) into series and run state."""

    def __init__(self, whitening: bool = False, maxlen: int = 600):
        self.whitening = whitening
        self.maxlen = maxlen
        self._series: dict[str, MetricSeries] = {}
        self.step: int | None = None
        self.max_steps: int | None = None
        self.phase: str | None = None
        self.phase_message: str = ""
        self.phase_ts: float | None = None  # when the current phase began (record time)
        self.phase_step: int | None = None  # the step the current phase belongs to
        self.mode: str | None = None
        self.run: dict[str, Any] = {}
        self.warnings: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.last_metrics: dict[str, Any] | None = None
        self.n_records = 0
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self._rate_points: deque[tuple[float, int]] = deque(maxlen=50)  # (ts, step) of metrics records

    # ----------------------------------------------------------------------------------- input
    def update(self, record: dict[str, Any]) -> list[str]:
        """Fold one record in; returns the series keys it touched."""
        if not isinstance(record, dict):
            return []
        self.n_records += 1
        ts = _as_float(record.get("ts"))
        if ts is not None:
            self.first_ts = ts if self.first_ts is None else self.first_ts
            self.last_ts = ts
        event = record.get("event", "metrics")
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool) and event != "phase":  # a phase's step is in progress
            # metrics/status say where the run is (a resumed run may restart lower); others only advance it.
            if self.step is None or event in ("metrics", "status"):
                self.step = step
            else:
                self.step = max(self.step, step)
        max_steps = record.get("max_steps")
        if isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0:
            self.max_steps = max_steps
        touched: list[str] = []
        if event == "metrics":
            self.last_metrics = record
            if ts is not None and isinstance(step, int):
                self._rate_points.append((ts, step))
            if ts is not None and self.phase not in ("done", "error", "stopped"):
                self.phase_ts = ts  # the next step starts now
                self.phase_step = step + 1 if isinstance(step, int) else None
            touched = self._add_values(record, step if isinstance(step, int) else None)
        elif event == "eval":
            self.evals.append(record)
            touched = self._add_values(record, step if isinstance(step, int) else None)
        elif event == "status":
            self.phase = str(record.get("phase") or self.phase or "")
            self.phase_message = str(record.get("message") or "")
            self.phase_ts = ts
            self.phase_step = step + 1 if isinstance(step, int) and self.phase in ("training", "resumed") else step
        elif event == "phase":  # within a step: generating / scoring / training (log-contract.md)
            if self.phase not in ("done", "error", "stopped"):
                self.phase = str(record.get("phase") or self.phase or "")
                self.phase_ts = ts
                self.phase_step = step if isinstance(step, int) else self.phase_step
        elif event == "warning":
            self.warnings.append(record)
        elif event == "error":
            self.errors.append(record)
            self.phase = "error"
            self.phase_message = str(record.get("message") or "")
        elif event == "checkpoint":
            self.checkpoints.append(record)
        elif event == "run":
            self.run = record
            if record.get("mode"):
                self.mode = str(record["mode"])
        return touched

    def update_many(self, records: Iterable[dict[str, Any]]) -> list[str]:
        touched: list[str] = []
        for r in records:
            for k in self.update(r):
                if k not in touched:
                    touched.append(k)
        return touched

    def _add_values(self, record: dict[str, Any], step: int | None) -> list[str]:
        touched = []
        for key, value in record.items():
            if key in _NOT_SERIES or isinstance(value, (str, bool, list, dict)):
                continue
            if value is not None and _as_float(value) is None:
                continue
            self.series(key).add(value, step)
            touched.append(key)
        return touched

    # ---------------------------------------------------------------------------------- output
    def series(self, key: str) -> MetricSeries:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = MetricSeries(key, self.maxlen)
        return s

    def has(self, key: str) -> bool:
        s = self._series.get(key)
        return s is not None and s.n_total > 0

    def keys(self) -> list[str]:
        return [k for k, s in self._series.items() if s.n_total > 0]

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "error")

    def phase_elapsed(self, now: float) -> float | None:
        """Seconds in the current phase (None when the log has not said)."""
        if self.phase_ts is None or self.phase in ("done", "error", "stopped"):
            return None
        return max(0.0, now - self.phase_ts)

    def step_time(self) -> float | None:
        """Typical seconds per step: the recent rate, else the last `step_time_s`."""
        pts = list(self._rate_points)
        if len(pts) >= 2:
            (t0, s0), (t1, s1) = pts[0], pts[-1]
            if s1 > s0 and t1 > t0:
                return (t1 - t0) / (s1 - s0)
        st = self._series.get("step_time_s")
        return st.last if st is not None and st.last else None

    @property
    def progress(self) -> float | None:
        if self.step is None or not self.max_steps:
            return None
        return max(0.0, min(1.0, self.step / self.max_steps))

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left: the rate of the recent metrics records, else `step_time_s`."""
        if self.step is None or not self.max_steps or self.phase in ("done", "error", "stopped"):
            return None
        left = self.max_steps - self.step
        if left <= 0:
            return 0.0
        per_step = self.step_time()
        return left * per_step if per_step else None

    def health(self, key: str) -> Health:
        """good: in its healthy range and not trending against the desired direction;
        warn: outside the healthy range or trending the wrong way; bad: past the spec's alarm
        value (or the last value was NaN/inf); unknown: no data or nothing to judge by."""
        s = self._series.get(key)
        if s is None or s.n_total == 0:
            return "unknown"
        if not s.last_is_finite:
            return "bad"
        value = s.last
        assert value is not None
        spec = METRICS.get(key)
        bad = bad_range(key, self.whitening)
        if bad is not None:
            lo, hi = bad
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                return "bad"
        if key == "grad_norm" and value == 0.0:
            # A zero-advantage skip is normal; consistently zero is not.
            recent = list(s.values)[-5:]
            return "warn" if len(recent) >= 3 and all(v == 0.0 for v in recent) else "good"
        rng = healthy_range(key, self.whitening)
        if rng is not None and not (rng[0] <= value <= rng[1]):
            return "warn"
        desired = spec.desired if spec else None
        trend = s.trend()
        if desired is not None and trend in ("up", "down") and trend != desired:
            return "warn"
        if rng is None and (desired is None or trend != desired):
            return "unknown"
        return "good"

    def console_line(self, record: dict[str, Any] | None = None) -> str:
        """`step 12/20 | align +0.412 ^ | divers +0.023 v | cfm 4.231 v | reward +0.389 ^ | gn 1.10 | 3.2s`

        The engine's console format (docs/log-contract.md), for the last metrics record, or for
        `record` right after it was folded in. Arrows follow the engine's rule (`console_arrow`)."""
        rec = record if record is not None else self.last_metrics
        if rec is None:
            return ""
        step = rec.get("step", self.step)
        max_steps = rec.get("max_steps", self.max_steps)
        parts = [f"step {step}/{max_steps}" if max_steps else f"step {step}"]

        def with_arrow(key: str, short: str, fmt: str) -> str:
            value = _as_float(rec.get(key))
            series = self._series.get(key)
            prev = list(series.values) if series is not None else []
            if value is not None and math.isfinite(value) and prev:
                prev = prev[:-1]  # the record's own value is the last one stored
            text = format(value, fmt) if value is not None and math.isfinite(value) else "nan"
            return f"{short} {text} {console_arrow(value, prev)}"

        for key in CONSOLE_KEYS:
            spec = METRICS[key]
            if key in rec and spec.desired is not None:
                parts.append(with_arrow(key, spec.short, spec.fmt))
        if "ebft/alignment" not in rec and "loss" in rec:  # a mode without feature rewards
            parts.append(with_arrow("loss", "loss", ".4f"))
        if "grad_norm" in rec:
            gn = _as_float(rec.get("grad_norm"))
            parts.append(f"gn {gn:.2f}" if gn is not None and math.isfinite(gn) else "gn nan")
        if "step_time_s" in rec:
            st = _as_float(rec.get("step_time_s"))
            parts.append(f"{st:.1f}s" if st is not None and math.isfinite(st) else "nans")
        return " | ".join(parts)


def console_arrow(value: float | None, previous: list[float], window: int = 5) -> str:
    """The engine's console arrow: `^`/`v`/`=` for the value against the mean of the previous
    `window` finite values, with a 1e-3 relative tolerance (ebft_engine/metrics.py `trend`)."""
    prev = [p for p in previous[-window:] if math.isfinite(p)]
    if value is None or not math.isfinite(value) or not prev:
        return "="
    base = sum(prev) / len(prev)
    tolerance = 1e-3 * max(abs(base), abs(value), 1e-6)
    if value > base + tolerance:
        return "^"
    if value < base - tolerance:
        return "v"
    return "="


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

