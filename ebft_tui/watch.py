"""`ebft watch RUN_DIR`: a read-only view of a run, from its files only.

Prints the run's history (one console line per logged step, warnings, errors), then follows
`metrics.jsonl` until the run is over: `state.json` says finished/failed/stopped, or its launcher
is gone, or (for runs started without the supervisor, e.g. `ebft train`) the log says done/error.
`--once` prints the history and a per-metric summary, then exits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import yaml

from ebft_tui.catalog import CARD_KEYS, METRICS
from ebft_tui.headless import record_lines
from ebft_tui.metrics.history import MetricHistory, format_duration
from ebft_tui.overrides import get_path
from ebft_tui.runs.layout import RunDir, pid_alive
from ebft_tui.runs.tail import JsonlFollower

FINAL = ("finished", "failed", "stopped")


class NotARunDir(FileNotFoundError):
    pass


def _whitening(rd: RunDir) -> bool:
    try:
        cfg = yaml.safe_load(rd.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False
    return bool(get_path(cfg, "ebft.use_whitening", False)) if isinstance(cfg, dict) else False


def run_status(rd: RunDir, history: MetricHistory) -> str:
    """finished / failed / stopped / running / starting / unknown, from state.json and the log."""
    state = rd.read_state()
    if state:
        status = str(state.get("status", "unknown"))
        if status in FINAL:
            return status
        procs = state.get("processes") or []
        if not pid_alive(state.get("launcher_pid")) and not any(pid_alive(p.get("pid")) for p in procs):
            return "finished" if history.phase == "done" else "failed"
        return status
    if history.phase == "done":
        return "finished"
    if history.phase == "error":
        return "failed"
    return "running" if history.n_records else "unknown"


def summary_lines(rd: RunDir, history: MetricHistory, status: str) -> list[str]:
    lines = [f"run {rd.path.resolve()}: {status}"]
    if history.max_steps:
        lines[0] += f", step {history.step}/{history.max_steps}"
    if history.first_ts and history.last_ts:
        lines[0] += f", {format_duration(history.last_ts - history.first_ts)} logged"
    for key in CARD_KEYS:
        if not history.has(key):
            continue
        spec, s = METRICS[key], history.series(key)
        trend = s.trend() or "-"
        nan = f"  {s.n_nonfinite} non-finite" if s.n_nonfinite else ""
        lines.append(f"  {spec.label:<13} last {spec.format(s.last):>8}  min {spec.format(s.min):>8}  "
                     f"max {spec.format(s.max):>8}  trend {trend:<4}  {history.health(key)}{nan}")
    if history.checkpoints:
        lines.append(f"  last checkpoint: {history.checkpoints[-1].get('path', '')}")
    for err in history.errors[-1:]:
        lines.append(f"  error: {err.get('message', '')}" + (f" -> {err['hint']}" if err.get("hint") else ""))
    return lines


def check_run_dir(run_dir: str | Path) -> RunDir:
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise NotARunDir(f"{rd.path} is not a directory")
    if not rd.metrics.exists() and not rd.state.exists():
        raise NotARunDir(f"{rd.path} has no metrics.jsonl or state.json: not a run directory (or it has not started)")
    return rd


def watch_run(run_dir: str | Path, once: bool = False, poll_s: float = 0.5,
              out: Callable[[str], None] = print) -> int:
    """Print, then follow. Returns 0, or 1 when the run failed."""
    rd = check_run_dir(run_dir)
    history = MetricHistory(whitening=_whitening(rd))
    with JsonlFollower(rd.metrics) as follower:
        while True:
            batch = follower.read_new()
            for rec in batch:
                for line in record_lines(history, rec):
                    out(line)
            status = run_status(rd, history)
            if once or (status in FINAL and not batch):
                break
            if not batch:
                time.sleep(poll_s)
    for line in summary_lines(rd, history, status):
        out(line)
    return 1 if status == "failed" else 0
