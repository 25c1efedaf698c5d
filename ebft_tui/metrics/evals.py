"""One line per `ebft eval` record, with arrows against the eval before it.

`ebft eval`, and a run with `eval_steps` as it trains, append `eval` records to the run's
`metrics.jsonl` (docs/log-contract.md). An eval is rare and each one is a verdict on the whole
model, so the run screen lists the last few side by side instead of drawing a card per number: the
question it answers is "did training help?".
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

# (record key, label, direction the number should move: -1 lower is better, 1 higher is better)
EVAL_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("eval/ce_loss", "CE", -1),
    ("eval/cfm_loss", "CFM", -1),
    ("eval/alignment", "align", 1),
    ("eval/pass@1", "pass@1", 1),
)
MAX_EVAL_LINES = 3


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def model_label(record: dict[str, Any]) -> str:
    """`training` for the evals a run makes as it trains (eval_steps), else `base model`, or the
    adapter's last two path parts (`run-a/adapter`)."""
    if record.get("in_training") is True:
        return "training"
    adapter = record.get("adapter")
    if not adapter:
        return "base model"
    parts = PurePath(str(adapter)).parts
    return "/".join(parts[-2:])


def eval_line(record: dict[str, Any], previous: dict[str, Any] | None, markup: bool = False) -> str:
    """`step 8 · run/adapter: CE 1.147 ↓ · CFM 0.467 ↓ · align +0.611 ↑ · pass@1 0.000 (5 tasks)`.

    An arrow appears only when the previous eval has the same number; with `markup` it is green
    when the number moved the way we want and red when it moved against it.
    """
    step = record.get("step")
    head = (f"step {step} · " if isinstance(step, int) and not isinstance(step, bool) else "") + model_label(record)
    parts = []
    for key, label, wanted in EVAL_FIELDS:
        value = _number(record.get(key))
        if value is None:
            continue
        text = f"{label} {value:+.3f}" if key == "eval/alignment" else f"{label} {value:.3f}"
        if key == "eval/pass@1" and _number(record.get("eval/n_code_tasks")) is not None:
            text += f" ({int(record['eval/n_code_tasks'])} tasks)"
        before = _number(previous.get(key)) if previous else None
        if before is not None:
            sign = (value > before) - (value < before)
            arrow = {1: "↑", -1: "↓", 0: "→"}[sign]
            if markup and sign:
                arrow = f"[{'green' if sign == wanted else 'red'}]{arrow}[/]"
            text += f" {arrow}"
        parts.append(text)
    if markup:
        head = head.replace("[", r"\[")
    return f"{head}: " + (" · ".join(parts) if parts else "no numbers")


def eval_lines(evals: list[dict[str, Any]], markup: bool = False, limit: int = MAX_EVAL_LINES) -> list[str]:
    """The last `limit` evals, oldest first, each compared with the eval just before it."""
    lines = []
    for i, record in enumerate(evals):
        lines.append(eval_line(record, evals[i - 1] if i else None, markup=markup))
    return lines[-limit:]
