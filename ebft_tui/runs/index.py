"""Past and live runs under an outputs folder, for the runs screen (no Textual here).

A run directory is a folder with `metrics.jsonl` or `state.json`, found at most two levels
below the root (`outputs/NAME/` and `outputs/GROUP/NAME/`). Each gets one `RunSummary` read from
its files only: the history (`MetricHistory`), `state.json`, the launcher lock and the first
line of `config.yaml` (`# resolved by ebft from PRESET ...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ebft_tui.metrics.history import MetricHistory
from ebft_tui.runs.layout import RunDir
from ebft_tui.runs.lock import live_holder
from ebft_tui.runs.tail import read_jsonl

_FROM = re.compile(r"^#\s*resolved by ebft from\s+(\S+)")


@dataclass
class RunSummary:
    path: Path
    name: str
    preset: str = "?"
    mode: str = "?"
    step: int | None = None
    max_steps: int | None = None
    status: str = "unknown"
    live: bool = False
    started: float | None = None
    last: dict[str, float] = field(default_factory=dict)
    history: MetricHistory | None = None

    @property
    def steps_text(self) -> str:
        if self.step is None:
            return "-"
        return f"{self.step}/{self.max_steps}" if self.max_steps else str(self.step)


def find_run_dirs(root: str | Path, depth: int = 2) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[Path] = []

    def walk(d: Path, level: int) -> None:
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            rd = RunDir(child)
            if rd.metrics.is_file() or rd.state.is_file():
                found.append(child)
            elif level < depth:
                walk(child, level + 1)

    walk(root, 1)
    return found


def _preset_of(rd: RunDir) -> str:
    try:
        with open(rd.config, encoding="utf-8") as f:
            m = _FROM.match(f.readline())
    except OSError:
        return "?"
    return Path(m.group(1)).stem if m else "?"


def summarize(run_dir: str | Path) -> RunSummary:
    from ebft_tui.watch import run_status

    rd = RunDir(run_dir)
    history = MetricHistory()
    history.update_many(read_jsonl(rd.metrics))
    state = rd.read_state() or {}
    holder = live_holder(rd.path)
    status = run_status(rd, history)
    if holder is not None and status not in ("running", "starting", "stopping"):
        status = "running"
    summary = RunSummary(path=rd.path, name=rd.path.name, preset=_preset_of(rd),
                         mode=str(history.mode or state.get("mode") or "?"), step=history.step,
                         max_steps=history.max_steps, status=status, live=holder is not None,
                         started=state.get("launched_at") if isinstance(state.get("launched_at"), (int, float))
                         else history.first_ts, history=history)
    for key in ("ebft/alignment", "ebft/reward", "ebft/cfm_loss", "loss"):
        if history.has(key) and history.series(key).last is not None:
            summary.last[key] = history.series(key).last  # type: ignore[assignment]
    return summary


def list_runs(root: str | Path) -> list[RunSummary]:
    """Every run under `root`, newest first."""
    runs = [summarize(p) for p in find_run_dirs(root)]
    return sorted(runs, key=lambda r: r.started or 0.0, reverse=True)
