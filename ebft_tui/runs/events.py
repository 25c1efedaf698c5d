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

# Fields whose type the contract fixes (docs/log-contract.md); None is allowed where marked.
_INT_FIELDS = {"v": False, "step": True, "max_steps": True}
_NUM_FIELDS = {"ts": False, "epoch": True}
_STR_FIELDS = {"event": False, "phase": True, "message": True, "hint": True, "metric": True, "path": True,
               "mode": True, "base_model": True, "output_dir": True, "resumed_from": True, "adapter": True}
# Events whose other fields are numbers (or null for a non-finite value): all of a `metrics`
# record's, the `eval/...` ones of an `eval` record.
_NUMERIC_EVENTS = {"metrics", "eval"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def record_problem(d: Any) -> str | None:
    """Why a parsed line is not a record a reader may fold in (None: it is fine).

    Readers skip such records as they skip lines that are not JSON: a string where a number
    belongs, a list for `step`, a bool for a metric would otherwise reach the plots and the ETA.
    Unknown keys of non-numeric events pass (readers ignore what they do not know)."""
    if not isinstance(d, dict):
        return "not a JSON object"
    for key, nullable in _INT_FIELDS.items():
        if key in d and not (_is_int(d[key]) or (nullable and d[key] is None)):
            return f"{key} is not an integer"
    for key, nullable in _NUM_FIELDS.items():
        if key in d and not (_is_num(d[key]) or (nullable and d[key] is None)):
            return f"{key} is not a number"
    for key, nullable in _STR_FIELDS.items():
        if key in d and not (isinstance(d[key], str) or (nullable and d[key] is None)):
            return f"{key} is not a string"
    event = d.get("event", "metrics")
    if event in _NUMERIC_EVENTS:
        for key, value in d.items():
            if key in _INT_FIELDS or key in _NUM_FIELDS or key in _STR_FIELDS:
                continue
            if event == "eval" and not key.startswith("eval/"):
                continue  # notes beside the numbers (a sandbox warning...)
            if value is not None and not _is_num(value):
                return f"{key} is not a number"
    return None


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
