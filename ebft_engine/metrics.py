"""`RUN_DIR/metrics.jsonl` (docs/log-contract.md), the console line, and live troubleshooting hints.

The writer appends one complete line per record with a single `os.write` on an `O_APPEND` file, so a
kill can tear at most the last line; a later writer first ends such a torn line with `\\n` (it then
reads as one invalid line, which readers skip) instead of gluing its own record onto it.

A resumed run re-runs the steps between its checkpoint and the kill. Their records are already in
the file, so `MetricsLog.already_logged_through` makes the writer drop `metrics` and `warning`
records for those steps: the file keeps exactly one `metrics` record per logged step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

CONTRACT_VERSION = 1


def _clean(value: Any) -> Any:
    """JSON-safe copy: tensors/numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalar
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # not a single element
            return str(value)
        return _clean(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


class MetricsLog:
    """Append-only JSONL writer for one run. Every method writes one complete, flushed line."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.already_logged_through = 0
        """Steps up to this one are already in the file (a resumed run re-running them): their
        `metrics` and `warning` records are not written again."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a writer died mid-line: end that line, never extend it
                    self._write_bytes(b"\n")

    def _write_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def write(self, event: str, **fields: Any) -> dict[str, Any] | None:
        """Write one record; returns it (None when dropped as already logged)."""
        step = fields.get("step")
        if event in ("metrics", "warning") and isinstance(step, int) and step <= self.already_logged_through:
            return None
        record = {"v": CONTRACT_VERSION, "ts": time.time(), "event": event, **_clean(fields)}
        line = json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n"
        self._write_bytes(line.encode("utf-8"))
        return record

    def run(self, *, mode: str, max_steps: int, base_model: str, output_dir: str,
            resumed_from: str | None = None, **extra: Any) -> None:
        self.write("run", mode=mode, max_steps=max_steps, base_model=base_model,
                   output_dir=output_dir, resumed_from=resumed_from, **extra)

    def metrics(self, step: int, values: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.write("metrics", step=step, **values)

    def status(self, phase: str, step: int, message: str = "") -> None:
        self.write("status", phase=phase, step=step, message=message)

    def phase(self, step: int, phase: str, min_interval_s: float = 1.0) -> None:
        """Where the step in progress (`step`) is: generating / scoring / training. The first
        phase of a step is always written; later changes at most once per `min_interval_s`
        (micro-batches repeat the phases, and fast steps need no more than one line)."""
        now = time.monotonic()
        last = getattr(self, "_last_phase", None)
        if last is not None:
            last_step, last_phase, last_t = last
            if last_step == step and (last_phase == phase or now - last_t < min_interval_s):
                return
        self._last_phase = (step, phase, now)
        self.write("phase", step=step, phase=phase)

    def warning(self, step: int, metric: str, message: str, hint: str) -> dict[str, Any] | None:
        return self.write("warning", step=step, metric=metric, message=message, hint=hint)

    def error(self, step: int, message: str, hint: str = "") -> None:
        self.write("error", step=step, message=message, hint=hint)

    def checkpoint(self, step: int, path: str) -> None:
        self.write("checkpoint", step=step, path=path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every valid record of a metrics.jsonl, in order; torn or invalid lines are skipped.

    A last line without its `\\n` counts when it parses: the next writer will end it as it is."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and "event" in record:
            records.append(record)
    return records


def last_logged_step(records: Iterable[Mapping[str, Any]]) -> int:
    """Highest step that has a `metrics` record (0 when none)."""
    steps = [r["step"] for r in records if r.get("event") == "metrics" and isinstance(r.get("step"), int)]
    return max(steps, default=0)


# ---------------------------------------------------------------------------------------------
# Console line

CONSOLE_FIELDS = (  # (metric key, label, format)
    ("ebft/alignment", "align", "{:+.3f}"),
    ("ebft/diversity", "divers", "{:+.3f}"),
    ("ebft/cfm_loss", "cfm", "{:.3f}"),
    ("ebft/reward", "reward", "{:+.3f}"),
)
TREND_WINDOW = 5


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def trend(value: float, previous: Sequence[float], window: int = TREND_WINDOW) -> str:
    """`^` rising, `v` falling, `=` flat: the value against the mean of the last `window` values."""
    prev = [p for p in list(previous)[-window:] if _finite(p)]
    if not prev or not _finite(value):
        return "="
    base = sum(prev) / len(prev)
    tolerance = 1e-3 * max(abs(base), abs(value), 1e-6)
    if value > base + tolerance:
        return "^"
    if value < base - tolerance:
        return "v"
    return "="


def _fmt(fmt: str, value: Any) -> str:
    return fmt.format(value) if _finite(value) else "nan"


def console_line(step: int, max_steps: int, metrics: Mapping[str, Any],
                 history: Mapping[str, Sequence[float]]) -> str:
    """`step 12/20 | align +0.412 ^ | divers +0.023 v | cfm 4.231 v | reward +0.389 ^ | gn 1.10 | 3.2s`.

    `history` holds each metric's previously logged values (not the current one). Fields whose
    metric is absent are left out; a non-finite value prints as `nan`."""
    parts = [f"step {step}/{max_steps}"]
    for key, label, fmt in CONSOLE_FIELDS:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{label} {_fmt(fmt, value)} {trend(value, history.get(key, ()))}")
    if "ebft/alignment" not in metrics and "loss" in metrics:  # a mode without feature rewards
        parts.append(f"loss {_fmt('{:.4f}', metrics['loss'])} {trend(metrics['loss'], history.get('loss', ()))}")
    if "grad_norm" in metrics:
        parts.append(f"gn {_fmt('{:.2f}', metrics['grad_norm'])}")
    if "step_time_s" in metrics:
        parts.append(f"{_fmt('{:.1f}', metrics['step_time_s'])}s")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# Live troubleshooting: the spec's Monitoring and Troubleshooting tables as warnings


@dataclass
class HealthRule:
    metric: str
    bad: Callable[[float], bool]
    patience: int
    """Consecutive logged values that must be bad before the warning fires."""
    message: str
    hint: str


def health_rules(*, use_whitening: bool = False) -> list[HealthRule]:
    rules = [
        HealthRule("ebft/alignment", lambda x: x < 0.1, 5, "alignment stays below 0.1",
                   "Feature layers may not capture useful information: try different "
                   "feature_layers or embed_method"),
        HealthRule("ebft/reward", lambda x: abs(x + 1.0) <= 0.05, 5, "reward stuck at -1.0",
                   "The diversity penalty dominates alignment: reduce diversity_coef or increase "
                   "alignment_coef"),
        HealthRule("grad_norm", lambda x: x == 0.0, 10, "grad_norm stays at 0.0",
                   "All micro-batches have zero advantage: increase num_generations "
                   "(n_samples_per_prompt in strided mode) or check data quality"),
        HealthRule("grad_norm", lambda x: x > 10.0, 3, "grad_norm stays above 10",
                   "Training is unstable: lower learning_rate or max_grad_norm"),
        HealthRule("entropy", lambda x: x < 0.01, 3, "entropy below 0.01",
                   "Mode collapse: increase temperature or diversity_coef"),
        HealthRule("ebft/cfm_loss", lambda x: x > 100.0, 3, "cfm_loss stays above 100",
                   "Training is unstable: lower learning_rate, or check feature_layers/embed_method"),
        HealthRule("is_ratio_min", lambda x: x < 0.1, 3, "importance-sampling ratio min below 0.1",
                   "The policy is too far off-policy: change vllm_sync_interval (sync weights more "
                   "often)"),
    ]
    if not use_whitening:
        # With whitening the samples of a group are orthonormal: diversity is ~0 by construction
        # and its healthy range means nothing (decisions.md §7), so it is not flagged.
        rules.append(HealthRule("ebft/diversity", lambda x: x > 1.0, 2, "diversity exceeds 1.0",
                                "Mode collapse, generations are too similar: increase "
                                "diversity_coef or temperature"))
    return rules


@dataclass
class HealthWarning:
    step: int
    metric: str
    message: str
    hint: str


@dataclass
class HealthMonitor:
    """Feeds on logged metrics; a rule warns once when its condition has held for `patience`
    consecutive logs, and again only after the condition cleared (a new episode)."""

    use_whitening: bool = False
    rules: list[HealthRule] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.rules:
            self.rules = health_rules(use_whitening=self.use_whitening)
        self._recent = [deque(maxlen=r.patience) for r in self.rules]
        self._fired = [False] * len(self.rules)

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[HealthWarning]:
        warnings = []
        for i, rule in enumerate(self.rules):
            value = metrics.get(rule.metric)
            if not _finite(value):
                continue  # absent this log (or nan): neither extends nor ends an episode
            bad = bool(rule.bad(float(value)))
            recent = self._recent[i]
            recent.append(bad)
            if not bad:
                self._fired[i] = False
                recent.clear()
            elif len(recent) == rule.patience and not self._fired[i]:
                self._fired[i] = True
                shown = f"{float(value):.3g}"
                warnings.append(HealthWarning(step, rule.metric,
                                              f"{rule.message} ({rule.metric} = {shown} for "
                                              f"{rule.patience} logs)", rule.hint))
        return warnings
