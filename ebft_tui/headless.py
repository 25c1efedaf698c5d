"""`ebft run --headless`: the supervisor + log follower + metric history, without Textual.

On a terminal: the engine's console lines scroll by with a Rich `Live` status panel below them
(processes, metric rows with value/arrow/health colour, progress with ETA). Not a terminal (nohup,
`| tee`, CI): Rich `Live` would print only its final render, so plain lines instead: one per
logged step in the engine's console format, warnings and process events as lines, and a summary.

Ctrl+C once: graceful stop, which keeps its word: the trainer finishes its step, checkpoints and
exits, however long that takes (the panel counts the seconds); twice: SIGKILL the groups (the run
resumes from its last checkpoint). SIGTERM/SIGHUP stop the children the same way. The run dir is
locked while we run (runs/lock.py). Exit code: the trainer's (130 after Ctrl+C). The progress bar
and ETA are `rich.progress`.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ebft_tui.catalog import CARD_KEYS, METRICS
from ebft_tui.metrics.history import MetricHistory, format_duration
from ebft_tui.runs import lock
from ebft_tui.runs.plan import LaunchPlan
from ebft_tui.runs.supervisor import LaunchFailed, ProcState, Supervisor, SupervisorEvent
from ebft_tui.runs.tail import JsonlFollower

HEALTH_STYLE = {"good": "green", "warn": "yellow", "bad": "bold red", "unknown": "dim"}
POLL_S = 0.2


# ----------------------------------------------------------------------------- line formats
def record_lines(history: MetricHistory, record: dict[str, Any]) -> list[str]:
    """Fold `record` into `history` and return the plain lines it prints as (maybe none)."""
    history.update(record)
    event = record.get("event", "metrics")
    if event == "metrics":
        return [history.console_line(record)]
    step = record.get("step")
    at = f" (step {step})" if isinstance(step, int) else ""
    if event == "warning":
        metric = f"{record['metric']}: " if record.get("metric") else ""
        hint = f" -> {record['hint']}" if record.get("hint") else ""
        return [f"warning{at}: {metric}{record.get('message', '')}{hint}"]
    if event == "error":
        hint = f" -> {record['hint']}" if record.get("hint") else ""
        return [f"error{at}: {record.get('message', '')}{hint}"]
    if event == "checkpoint":
        return [f"checkpoint{at}: {record.get('path', '')}"]
    if event == "eval":
        vals = " | ".join(f"{k} {v:.4g}" for k, v in record.items()
                          if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool))
        return [f"eval{at}: {vals}"]
    if event == "status":
        msg = f": {record['message']}" if record.get("message") else ""
        return [f"[{record.get('phase', '?')}]{at}{msg}"]
    return []


def event_lines(ev: SupervisorEvent) -> list[str]:
    pid = f" (pid {ev.pid})" if ev.pid else ""
    if ev.kind == "started":
        return [f"[ebft] {ev.name} started{pid}"]
    if ev.kind == "ready":
        return [f"[ebft] {ev.name} {ev.message}"]
    if ev.kind == "failed":
        lines = [f"[ebft] {ev.name} failed: {ev.message}"]
        if ev.log_tail:
            lines.append(f"[ebft] last lines of {ev.name}.log:")
            lines += [f"    {ln}" for ln in ev.log_tail]
        return lines
    return [f"[ebft] {ev.name} {ev.message or ev.kind}"]


def summary_lines(plan: LaunchPlan, history: MetricHistory, rc: int, elapsed_s: float, how: str) -> list[str]:
    layout = plan.layout
    logs = [str(p.log_path) for p in plan.processes] + [str(layout.metrics)]
    lines = [
        f"[ebft] run {how} (exit code {rc}) after {format_duration(elapsed_s)}",
        f"[ebft] run dir: {plan.run_dir}",
    ]
    if history.last_metrics is not None:
        lines.append(f"[ebft] last: {history.console_line()}")
    if history.warnings:
        lines.append(f"[ebft] {len(history.warnings)} warning(s); last: {history.warnings[-1].get('message', '')}")
    if history.errors:
        err = history.errors[-1]
        hint = f" -> {err['hint']}" if err.get("hint") else ""
        lines.append(f"[ebft] error: {err.get('message', '')}{hint}")
    lines.append(f"[ebft] logs: {', '.join(logs)}")
    return lines


# ------------------------------------------------------------------------------ live panel
def _fmt_uptime(st: ProcState, now: float) -> str:
    if st.started_at is None:
        return "--"
    end = st.ended_at or now
    return format_duration(end - st.started_at)


def make_progress() -> Progress:
    """The step bar: done/total, the bar, the ETA (rich's own, from the steps' pace over the last
    hour, so minutes-long CPU steps still get one) and the phase within the step."""
    return Progress(
        TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=30), TextColumn("ETA"),
        TimeRemainingColumn(compact=True), TextColumn("{task.fields[phase]}", style="magenta"),
        speed_estimate_period=3600.0, auto_refresh=False,
    )


def update_progress(progress: Progress, task: TaskID, history: MetricHistory, ended: bool = False) -> None:
    phase = history.phase or ""
    elapsed = history.phase_elapsed(time.time())
    if phase and elapsed is not None and not ended:
        phase = f"{phase} · {format_duration(elapsed)}"
    progress.update(task, total=history.max_steps or None, completed=history.step or 0, phase=phase)
    if ended:
        progress.stop_task(task)


def render_panel(plan: LaunchPlan, history: MetricHistory, states: list[ProcState],
                 samples: dict[str, Any], gpus: list[Any], gpu_note: str | None, note: str = "",
                 progress: Progress | None = None) -> Group:
    now = time.time()
    head = Text.assemble(("ebft ", "bold"), (f"{plan.mode} ", "cyan"), (str(plan.run_dir), "dim"))
    if history.phase:
        head.append(f"  [{history.phase}]", style="magenta")
    gpu_text = Text()
    if gpus:
        for g in gpus:
            mem = f"{(g.mem_used_mb or 0) / 1024:.1f}/{(g.mem_total_mb or 0) / 1024:.1f} GiB"
            util = "n/a" if g.util_percent is None else f"{g.util_percent:.0f}%"
            gpu_text.append(f"GPU{g.index} {util} {mem}  ")
    else:
        gpu_text.append(f"no GPU ({gpu_note or 'none found'}): CPU run", style="dim")

    procs = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("process", "pid", "state", "uptime", "CPU%", "RSS"):
        procs.add_column(col, justify="right" if col in ("pid", "CPU%", "RSS") else "left")
    for st in states:
        smp = samples.get(st.name)
        style = {"failed": "red", "ready": "green", "running": "green", "starting": "yellow"}.get(st.state, "dim")
        state = st.state + (f" ({st.returncode})" if st.returncode is not None else "")
        procs.add_row(st.name, str(st.pid or "-"), Text(state, style=style), _fmt_uptime(st, now),
                      f"{smp.cpu_percent:.0f}" if smp else "-", f"{smp.rss_mb:.0f}M" if smp else "-")

    mt = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("metric", "last", "trend", "min", "max", "healthy"):
        mt.add_column(col, justify="left" if col in ("metric", "healthy") else "right")
    for key in CARD_KEYS:
        if not history.has(key):
            continue
        spec = METRICS[key]
        s = history.series(key)
        health = history.health(key)
        style = HEALTH_STYLE[health]
        arrow = {"up": "^", "down": "v", "flat": "="}.get(s.trend() or "", " ")
        rng = "" if spec.healthy is None else f"{spec.healthy[0]:g}..{spec.healthy[1]:g}"
        if history.whitening and key == "ebft/diversity":
            rng = "(whitened)"
        nan = f" {s.n_nonfinite} NaN" if s.n_nonfinite else ""
        mt.add_row(spec.label, Text(spec.format(s.last) + nan, style=style), Text(arrow, style=style),
                   spec.format(s.min), spec.format(s.max), rng)

    step, max_steps = history.step, history.max_steps
    if max_steps and progress is not None:
        prog: Any = progress
    else:
        prog = Text("waiting for the first step..." if step is None else f"step {step}", style="dim")
    parts: list[Any] = [head, gpu_text, procs, mt, prog]
    if history.warnings:
        w = history.warnings[-1]
        parts.append(Text(f"warning: {w.get('message', '')} -> {w.get('hint', '')}", style="yellow"))
    if note:
        parts.append(Text(note, style="bold yellow"))
    return Group(*parts)


# ---------------------------------------------------------------------------------- runner
class _Interrupts:
    def __init__(self) -> None:
        self.count = 0
        self.signal: int | None = None


async def _sample_resources(sup: Supervisor, samplers: dict[int, Any]) -> tuple[dict[str, Any], list[Any], str | None]:
    """Per-process CPU/RSS and the GPUs, sampled in a thread (NVML and psutil are slow)."""
    from ebft_tui.system.gpus import list_gpus, nvml_unavailable_reason
    from ebft_tui.system.procs import GroupSampler

    def work():
        out = {}
        for st in sup.states():
            if st.pid and st.alive:
                sm = samplers.get(st.pid)
                if sm is None:
                    sm = samplers[st.pid] = GroupSampler(st.pid)
                out[st.name] = sm.sample()
        return out, list_gpus(), nvml_unavailable_reason()

    return await asyncio.to_thread(work)


async def run_headless_async(
    plan: LaunchPlan,
    console: Console | None = None,
    live: bool | None = None,
    stop_grace_s: float = 10.0,
    out: Callable[[str], None] | None = None,
) -> int:
    console = console or Console()
    live = console.is_terminal if live is None else live
    if out is None:
        def out(line: str) -> None:
            if live:
                console.print(Text(line))
            else:
                print(line, flush=True)

    history = MetricHistory(whitening=plan.whitening)
    follower = JsonlFollower(plan.metrics_path)
    history.update_many(follower.read_new())  # a resumed run: earlier records feed trends, unprinted
    for w in plan.warnings:
        out(f"[ebft] note: {w}")

    def pump() -> None:
        for rec in follower.read_new():
            for line in record_lines(history, rec):
                out(line)

    def on_event(ev: SupervisorEvent) -> None:
        pump()  # the log lines a process wrote come before the news that it ended
        for line in event_lines(ev):
            out(line)

    sup = Supervisor(plan, on_event=on_event, stop_grace_s=stop_grace_s)
    intr = _Interrupts()
    loop = asyncio.get_running_loop()
    note = {"text": "", "since": 0.0}

    def on_signal(sig: int) -> None:
        intr.count += 1
        intr.signal = intr.signal or sig
        if intr.count == 1:
            what = "Ctrl+C" if sig == signal.SIGINT else signal.Signals(sig).name
            msg = (f"{what}: stopping after this step (the trainer saves a checkpoint, then exits)... "
                   "Ctrl+C again to kill now")
            note["text"], note["since"] = msg, time.time()
            out(f"[ebft] {msg}")
            loop.create_task(sup.stop(reason="user"))
        elif sig == signal.SIGINT or intr.count > 2:
            note["text"] = "killing now (the run resumes from its last checkpoint)..."
            out("[ebft] killing now (the run resumes from its last checkpoint)...")
            sup.kill()

    # RunDirLocked: another launcher runs there (the CLI says who)
    lock.acquire(plan.run_dir, command="ebft run --headless: " + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)

    async def supervise() -> int:
        await sup.start()
        return await sup.wait()

    started = time.time()
    task = loop.create_task(supervise())
    live_ctx = None
    samplers: dict[int, Any] = {}
    samples: dict[str, Any] = {}
    gpus: list[Any] = []
    gpu_note: str | None = None
    last_sample = 0.0
    progress = make_progress()
    bar = progress.add_task("steps", total=None, phase="")

    def note_text() -> str:
        if note["since"] and not task.done():
            return f"{note['text']} ({format_duration(time.time() - note['since'])})"
        return note["text"]

    try:
        if live:
            from rich.live import Live

            live_ctx = Live(console=console, refresh_per_second=2, transient=False)
            live_ctx.start()
        while True:
            pump()
            if task.done():
                break
            if live_ctx is not None:
                if time.monotonic() - last_sample >= 1.0:
                    last_sample = time.monotonic()
                    samples, gpus, gpu_note = await _sample_resources(sup, samplers)
                update_progress(progress, bar, history)
                live_ctx.update(render_panel(plan, history, sup.states(), samples, gpus, gpu_note, note_text(),
                                             progress))
            await asyncio.wait([task], timeout=POLL_S)
        pump()
        try:
            rc = task.result()
            how = "finished" if rc == 0 else "failed"
        except LaunchFailed as e:
            if not intr.count:
                out(f"[ebft] cannot start the run: {e}")
            rc, how = 1, "failed to start"
    finally:
        if not task.done():  # an exception in this loop: never leave children behind
            task.cancel()
            await sup.stop(grace_s=2.0, reason="cleanup")
        if live_ctx is not None:
            update_progress(progress, bar, history, ended=True)
            live_ctx.update(render_panel(plan, history, sup.states(), samples, gpus, gpu_note, note["text"], progress))
            live_ctx.stop()
        for sig in handled:
            loop.remove_signal_handler(sig)
        follower.close()
        lock.release(plan.run_dir)
    if intr.count:
        rc = 130 if intr.signal == signal.SIGINT else 128 + int(intr.signal or signal.SIGTERM)
        how = "stopped"
    for line in summary_lines(plan, history, rc, time.time() - started, how):
        out(line)
    return rc


def run_headless(plan: LaunchPlan, console: Console | None = None, live: bool | None = None,
                 stop_grace_s: float = 10.0) -> int:
    """Run the plan to completion in this terminal; returns the exit code for the process."""
    return asyncio.run(run_headless_async(plan, console=console, live=live, stop_grace_s=stop_grace_s))


def is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False

