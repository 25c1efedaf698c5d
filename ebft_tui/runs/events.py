"""Typed views of `metrics.jsonl` records (docs/log-contract.md).

`MetricHistory` folds plain dicts; these dataclasses are for code that wants names instead of
string keys (the TUI's messages, tests). `parse_record` never raises on unknown events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CONTRACT_VERSION = 1
EVENTS = ("metrics", "status", "warning", "error", "checkpoint", "eval", "run")


@dataclass
class Record:
    event: str
    ts: float | None = None
    step: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class MetricRecord(Record):
    max_steps: int | None = None
    values: dict[str, float | None] = field(default_factory=dict)


@dataclass
class StatusRecord(Record):
    phase: str = ""
    message: str = ""


@dataclass
class WarningRecord(Record):
    metric: str | None = None
    message: str = ""
    hint: str = ""


@dataclass
class ErrorRecord(Record):
    message: str = ""
    hint: str = ""


@dataclass
class CheckpointRecord(Record):
    path: str = ""


@dataclass
class EvalRecord(Record):
    values: dict[str, float | None] = field(default_factory=dict)
    adapter: str | None = None


@dataclass
class RunRecord(Record):
    mode: str | None = None
    max_steps: int | None = None
    base_model: str | None = None
    output_dir: str | None = None
    resumed_from: str | None = None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


_BOOK = {"v", "ts", "event", "step", "max_steps", "adapter"}


def parse_record(d: dict[str, Any]) -> Record:
    event = str(d.get("event", "metrics"))
    ts = d.get("ts") if isinstance(d.get("ts"), (int, float)) else None
    common = dict(event=event, ts=ts, step=_int(d.get("step")), raw=d)
    if event == "metrics":
        vals = {k: v for k, v in d.items() if k not in _BOOK and _num(v)}
        return MetricRecord(**common, max_steps=_int(d.get("max_steps")), values=vals)
    if event == "status":
        return StatusRecord(**common, phase=str(d.get("phase", "")), message=str(d.get("message", "") or ""))
    if event == "warning":
        return WarningRecord(**common, metric=d.get("metric"), message=str(d.get("message", "") or ""),
                             hint=str(d.get("hint", "") or ""))
    if event == "error":
        return ErrorRecord(**common, message=str(d.get("message", "") or ""), hint=str(d.get("hint", "") or ""))
    if event == "checkpoint":
        return CheckpointRecord(**common, path=str(d.get("path", "")))
    if event == "eval":
        vals = {k: v for k, v in d.items() if k not in _BOOK and _num(v)}
        return EvalRecord(**common, values=vals, adapter=d.get("adapter"))
    if event == "run":
        return RunRecord(**common, mode=d.get("mode"), max_steps=_int(d.get("max_steps")),
                         base_model=d.get("base_model"), output_dir=d.get("output_dir"),
                         resumed_from=d.get("resumed_from"))
    return Record(**common)
