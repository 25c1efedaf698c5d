"""The run screen: metric cards, progress, hints, the process table and the children's logs.

Data flows one way. A 4 Hz timer reads what the files gained (`metrics.jsonl`, `trainer.log`,
`server.log`) and posts `MetricsBatch` / `LogLines`; a 1 s timer hands the supervisor's process
states to a thread worker that samples CPU/RAM/GPU memory and posts `ResourceSample`. Handlers
fold the data into `MetricHistory` and the widgets re-render from it.

The screen only shows a run; starting, stopping and restarting the children is the app's job
(`EbftApp.run_control`), so a quit or a signal can stop them whatever screen is on top. In watch
mode (`readonly`) there is no supervisor and the stop/restart keys are off.

Small terminals (under 100x32, e.g. 80x24) get a compact layout: cards without plots, fewer
hint lines, and the tabs keep at least a few log lines. Enter on a card opens its plot full-screen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from textual.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.events import Resize
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static, TabbedContent, TabPane

from ebft_tui.catalog import METRICS, healthy_range
from ebft_tui.metrics.evals import eval_lines
from ebft_tui.metrics.history import MetricHistory, format_duration
from ebft_tui.overrides import get_path
from ebft_tui.runs.layout import RunDir
from ebft_tui.runs.tail import JsonlFollower, TextFollower
from ebft_tui.tui.messages import (LogLines, MetricsBatch, ProcRow, ResourceSample, RunFinished,
                                   RunEvent)
from ebft_tui.tui.widgets.log_pane import LogPane
from ebft_tui.tui.widgets.metric_card import MetricCard, range_text
from ebft_tui.tui.widgets.metric_plot import series_from
from ebft_tui.tui.widgets.process_table import ProcessTable
from ebft_tui.tui.widgets.progress import RunProgress

CARD_KEYS = ["ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "grad_norm", "entropy"]
POLL_S = 0.25
SAMPLE_S = 1.0
MAX_HINTS = 6
COMPACT_BELOW = (100, 32)  # width, height


def hint_lines(history: MetricHistory, keys: list[str]) -> list[str]:
    """Troubleshooting hints, newest concerns last: a metric past the spec's alarm value gets the
    spec's fix; one merely outside its healthy range is named; then the run's own warning and
    error records (the engine's live checks)."""
    lines = []
    for key in keys:
        series = history.series(key)
        if series.n_total == 0:
            continue
        spec = METRICS[key]
        value = spec.format(series.last_raw)
        rng = healthy_range(key, history.whitening)
        if history.health(key) == "bad":
            lines.append(f"[b red]{spec.label} {value}[/]: {escape(spec.hint)}")
        elif rng is not None and series.last is not None and not (rng[0] <= series.last <= rng[1]):
            lines.append(f"[b yellow]{spec.label} {value}[/] is outside its healthy range {range_text(rng)}")
    for kind, style, records in (("error", "b red", history.errors[-2:]),
                                 ("warning", "b yellow", history.warnings[-3:])):
        for rec in records:
            hint = f" → {rec['hint']}" if rec.get("hint") else ""
            text = escape(f"step {rec.get('step', '?')}: {rec.get('message', '')}{hint}")
            lines.append(f"[{style}]{kind}[/] {text}")
    return lines[-MAX_HINTS:]


def read_run_config(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_event(event: Any) -> str:
    """One line for a supervisor event (a dataclass-ish object, a dict or a string)."""
    if isinstance(event, str):
        return event
    if isinstance(event, dict):
        get = event.get
    else:
        def get(name: str, default: Any = None) -> Any:
            return getattr(event, name, default)
    message = get("message") or ""
    name = get("name") or get("process") or ""
    kind = get("kind") or get("event") or get("state") or ""
    text = " ".join(str(x) for x in (name, kind) if x)
    return f"{text}: {message}" if message and text else (message or text)


def describe_states(states: list[Any]) -> str:
    """`server ready · trainer running` for the head line."""
    parts = []
    for s in states:
        rc = getattr(s, "returncode", None)
        parts.append(f"{s.name} {s.state}" + (f" ({rc})" if rc not in (None, 0) else ""))
    return " · ".join(parts) or "starting…"


def _tail_text(event: Any, n: int = 3) -> str:
    tail = [line for line in (getattr(event, "log_tail", None) or []) if line.strip()][-n:]
    return "".join(f"\n  {escape(line)}" for line in tail)


class RunScreen(Screen):
    """Shows one run directory. `log_paths` maps a child's name to its log file."""

    DEFAULT_CSS = """
    RunScreen #run-head { height: 1; padding: 0 1; background: $panel; }
    RunScreen #run-state { width: 1fr; }
    RunScreen #run-dir { width: auto; color: $text-muted; }
    RunScreen RunProgress { padding: 0 1; margin-bottom: 0; }
    RunScreen #cards { grid-size: 3 2; grid-gutter: 0 1; height: 3fr; min-height: 14; max-height: 22;
                       padding: 0 1; }
    RunScreen #hints { height: auto; max-height: 7; padding: 0 1; border: round $warning;
                       border-title-color: $warning; display: none; }
    RunScreen #hints.-shown { display: block; }
    RunScreen #evals { height: auto; max-height: 5; padding: 0 1; border: round $accent;
                       border-title-color: $accent; display: none; }
    RunScreen #evals.-shown { display: block; }
    RunScreen TabbedContent { height: 2fr; min-height: 8; }
    RunScreen TabPane { padding: 0; }
    RunScreen #log-search { dock: bottom; display: none; }
    RunScreen #log-search.-shown { display: block; }
    RunScreen.-compact #cards { height: auto; min-height: 8; max-height: 8; }
    RunScreen.-compact MetricCard { height: 4; min-height: 4; }
    RunScreen.-compact #hints { max-height: 3; }
    RunScreen.-compact #evals { max-height: 3; }
    RunScreen.-compact TabbedContent { min-height: 5; height: 1fr; }
    RunScreen.-compact #run-dir { display: none; }
    """

    BINDINGS = [
        Binding("s", "stop", "Stop run"),
        Binding("k", "kill", "Stop now"),
        Binding("r", "restart", "Restart"),
        Binding("f", "toggle_follow", "Follow log"),
        Binding("slash", "search", "Search log", show=False),
        Binding("ctrl+f", "search", "Search log", priority=True),
        Binding("escape", "close_search", "Close search", show=False),
        Binding("1", "tab('tab-procs')", "Processes", show=False),
        Binding("2", "tab('tab-trainer')", "Trainer log", show=False),
        Binding("3", "tab('tab-server')", "Server log", show=False),
    ]

    def __init__(self, run_dir: Path, log_paths: dict[str, Path], *, readonly: bool = False,
                 title: str = "", config: dict[str, Any] | None = None, attached: bool = False) -> None:
        super().__init__()
        # attached: a run re-opened from the runs screen; its launcher (a keeper or a headless
        # `ebft run`, named by launcher.lock) is asked to stop with SIGTERM, or SIGKILLed for
        # "stop now" (its lifeline then takes the run down at once). `ebft watch` never signals.
        self.attached = attached
        self.run_dir = Path(run_dir)
        self.log_paths = {name: Path(p) for name, p in log_paths.items()}
        self.readonly = readonly
        self.run_title = title or self.run_dir.name
        cfg = config if config is not None else read_run_config(self.run_dir)
        self.history = MetricHistory(whitening=bool(get_path(cfg, "ebft.use_whitening", False)))
        self.metrics_follower = JsonlFollower(self.run_dir / "metrics.jsonl")
        self.log_followers = {name: TextFollower(p) for name, p in self.log_paths.items()}
        self.state_text = ("attached" if attached else "watching (read-only)") if readonly else "starting…"
        self.extra_hints: list[str] = []
        self.finished: RunFinished | None = None
        self.n_batches = 0
        self.stop_since: float | None = None
        self.watch_status: str | None = None
        self.quitting = False
        self.compact = False
        self.plot_screen: Any = None

    # ---- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="run-head"):
            yield Static(self.state_text, id="run-state")
            yield Static(str(self.run_dir), id="run-dir")
        yield RunProgress()
        with Grid(id="cards"):
            for key in CARD_KEYS:
                yield MetricCard(METRICS[key], id="card-" + key.replace("/", "-").replace("_", "-"))
        hints = Static("", id="hints")
        hints.border_title = "hints"
        yield hints
        evals = Static("", id="evals")
        evals.border_title = "ebft eval"
        yield evals
        with TabbedContent(initial="tab-procs" if not self.readonly else "tab-trainer"):
            with TabPane("processes", id="tab-procs"):
                yield ProcessTable(id="procs")
            for name in self.log_paths:
                with TabPane(f"{name} log", id=f"tab-{name}"):
                    yield LogPane(name, id=f"log-{name}")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "ebft-tui"
        self.sub_title = f"{'watch' if self.readonly else 'run'}: {self.run_title}"
        self.poll_files()
        self.set_interval(POLL_S, self.poll_files)
        self.set_interval(1.0, self.tick)
        self.apply_size(self.app.size.width, self.app.size.height)
        if self.readonly:
            self.refresh_watch_state()
            self.set_interval(SAMPLE_S, self.refresh_watch_state)
        else:
            self.set_interval(SAMPLE_S, self.request_sample)

    def card(self, key: str) -> MetricCard:
        return self.query_one("#card-" + key.replace("/", "-").replace("_", "-"), MetricCard)

    # ---- following the files ------------------------------------------------------------------

    def poll_files(self) -> None:
        records = self.metrics_follower.read_new()
        if records:
            self.post_message(MetricsBatch(records))
        for name, follower in self.log_followers.items():
            lines = follower.read_new()
            if lines:
                self.post_message(LogLines(name, lines))

    @on(MetricsBatch)
    def _metrics(self, message: MetricsBatch) -> None:
        self.n_batches += 1
        self.history.update_many(message.records)
        self.render_metrics()

    @on(LogLines)
    def _log_lines(self, message: LogLines) -> None:
        try:
            self.query_one(f"#log-{message.name}", LogPane).add_lines(message.lines)
        except Exception:
            pass  # a log we have no tab for

    def render_metrics(self) -> None:
        h = self.history
        for key in CARD_KEYS:
            if h.has(key):
                self.card(key).show(h.series(key), h.health(key))
        self.render_progress()
        self.render_hints()
        self.render_evals()
        if self.plot_screen is not None and self.plot_screen.is_current:
            self.plot_screen.refresh_data()

    def render_progress(self) -> None:
        h = self.history
        ended = (self.finished is not None or h.phase in ("done", "error", "stopped")
                 or self.watch_status in ("finished", "failed", "stopped"))
        phase = h.phase
        if self.finished is not None and phase not in ("done", "error", "stopped"):
            phase = "stopped" if self.finished.stopped_by_user else ("failed" if self.finished.returncode else "done")
        elapsed = None if ended else h.phase_elapsed(time.time())
        self.query_one(RunProgress).show(h.step, h.max_steps, None if ended else h.eta_seconds(), phase,
                                         phase_elapsed=elapsed, phase_step=h.phase_step)

    def tick(self) -> None:
        """Once a second: the phase's elapsed time, and the stop countdown."""
        self.render_progress()
        if self.stop_since is not None and self.finished is None:
            self.set_state(self.stopping_text())

    def stopping_since(self, ts: float | None, quitting: bool = False) -> None:
        self.stop_since = ts or time.time()
        self.quitting = self.quitting or quitting
        self.set_state(self.stopping_text())
        self.refresh_bindings()

    def stopping_text(self) -> str:
        """`stopping: finishing step 4 and a checkpoint · 0:12 of ~0:40 · k: stop now`."""
        elapsed = time.time() - (self.stop_since or time.time())
        per_step = self.history.step_time()
        budget = f" of ~{format_duration(per_step)} (one step)" if per_step else ""
        step = self.history.phase_step
        what = f"finishing step {step} and a checkpoint" if step else "finishing the step and a checkpoint"
        head = "quitting after the stop" if self.quitting else "stopping"
        return f"{head}: {what} · {format_duration(elapsed)}{budget} · k: stop now"

    def render_evals(self) -> None:
        """`ebft eval` records of this run dir, newest last, arrows against the eval before."""
        lines = eval_lines(self.history.evals, markup=True)
        panel = self.query_one("#evals", Static)
        panel.update("\n".join(lines))
        panel.set_class(bool(lines), "-shown")

    def render_hints(self) -> None:
        lines = self.extra_hints + hint_lines(self.history, CARD_KEYS)
        hints = self.query_one("#hints", Static)
        hints.update("\n".join(lines[-MAX_HINTS:]))
        hints.set_class(bool(lines), "-shown")

    def add_hint(self, text: str) -> None:
        self.extra_hints = (self.extra_hints + [text])[-3:]
        self.render_hints()

    # ---- processes ----------------------------------------------------------------------------

    def request_sample(self) -> None:
        control = getattr(self.app, "run_control", None)
        if control is None:
            return
        states = control.states()
        if states:
            self.sample_resources(states)

    @work(thread=True, exclusive=True, group="sample", exit_on_error=False)
    def sample_resources(self, states: list[Any]) -> None:
        control = self.app.run_control
        try:
            rows = control.sample(states)
        except Exception:  # psutil/NVML hiccups: the table shows states without numbers
            rows = [ProcRow(name=s.name, state=str(s.state), pid=s.pid, returncode=s.returncode) for s in states]
        self.post_message(ResourceSample(rows))

    @on(ResourceSample)
    def _resources(self, message: ResourceSample) -> None:
        self.show_processes(message.rows)

    def refresh_watch_state(self) -> None:
        """Watch mode: the launcher's `state.json` says what runs (we own no process)."""
        from ebft_tui.watch import run_status

        rd = RunDir(self.run_dir)
        state = rd.read_state()
        if not state:
            return
        procs = state.get("processes") or []
        rows = [ProcRow(name=str(p.get("name", "?")), state=str(p.get("state", "?")), pid=p.get("pid"),
                        returncode=p.get("returncode")) for p in procs if isinstance(p, dict)]
        self.show_processes(rows)
        status = self.watch_status = run_status(rd, self.history)
        if self.stop_since is not None and status in ("running", "stopping"):
            self.set_state(self.stopping_text())
        else:
            if status in ("finished", "failed", "stopped"):
                self.stop_since = None
            self.set_state(f"{'attached' if self.attached else 'watching (read-only)'} · {status}"
                           + (f" · {describe_states(rows)}" if rows else ""))
        self.refresh_bindings()

    def show_processes(self, rows: list[ProcRow]) -> None:
        self.query_one(ProcessTable).show(rows)

    def set_state(self, text: str) -> None:
        self.state_text = text
        self.query_one("#run-state", Static).update(text)

    @on(RunEvent)
    def _run_event(self, message: RunEvent) -> None:
        event = message.event
        if isinstance(event, BaseException):
            self.set_state(f"launch failed: {event}".splitlines()[0][:200])
            self.add_hint(f"[b red]launch failed[/] {escape(str(event))}{_tail_text(event)}")
            return
        control = getattr(self.app, "run_control", None)
        kind = getattr(event, "kind", None)
        if kind == "stopping" and self.stop_since is None:
            self.stopping_since(getattr(control, "stop_requested_at", None) if control is not None else None)
        if kind == "started" and self.stop_since is not None:  # a restart came through
            self.stop_since = None
            self.finished = None
        if self.stop_since is not None and self.finished is None:
            self.set_state(self.stopping_text())
        elif control is not None:
            self.set_state(describe_states(control.states()))
        if kind == "failed":
            self.add_hint(f"[b red]{escape(describe_event(event))}[/]{_tail_text(event)}")

    @on(RunFinished)
    def run_finished(self, message: RunFinished) -> None:
        self.finished = message
        self.stop_since = None
        last = self.metrics_follower.read_new()  # the last records, folded now: the state line names
        if last:                                 # the checkpoint the stop wrote
            self.history.update_many(last)
            self.render_metrics()
        self.poll_files()
        ckpt = self.history.checkpoints[-1].get("path") if self.history.checkpoints else None
        if message.launch_error:
            self.set_state(f"launch failed: {message.launch_error}".splitlines()[0][:200])
        elif message.killed:
            self.set_state(f"killed (exit {message.returncode}): r resumes from "
                           + (escape(str(ckpt)) if ckpt else "the start (no checkpoint yet)") + " · ctrl+r: runs")
        elif message.stopped_by_user:
            self.set_state(f"stopped (exit {message.returncode})"
                           + (f", checkpoint {escape(str(ckpt))}" if ckpt else "") + " · r resumes · ctrl+r: runs")
        elif message.returncode == 0:
            self.set_state("finished ✓ (exit 0) · ctrl+r: runs")
        else:
            self.set_state(f"failed (exit {message.returncode}) · ctrl+r: runs")
        self.render_progress()
        self.refresh_bindings()

    # ---- keys ---------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Textual: False hides a key, None shows it dimmed (not now).
        if action in ("stop", "kill") and self.readonly and self.attached:
            holder = self.holder()
            if holder is None:
                return False
            return action == "stop" or self.stop_since is not None
        if action in ("stop", "restart", "kill"):
            if self.readonly:
                return False  # watch mode never signals a run
            control = getattr(self.app, "run_control", None)
            if action == "kill" and (self.stop_since is None or self.finished is not None):
                return False  # offered once a stop is under way
            if action == "stop" and (control is None or not control.alive):
                return None
        if action == "close_search":
            boxes = self.query("#log-search")
            return bool(boxes) and boxes.first().has_class("-shown")
        return True

    def action_stop(self) -> None:
        if self.readonly:
            self.signal_holder(stop_now=False)
        else:
            self.app.action_stop_run()

    def action_kill(self) -> None:
        if self.readonly:
            self.signal_holder(stop_now=True)
        else:
            self.app.action_kill_run()

    def holder(self) -> Any:
        """The live launcher of an attached run, if it is ours to signal (this host, `ebft run`)."""
        import socket

        from ebft_tui.runs.lock import live_holder

        info = live_holder(self.run_dir)
        if info is None or info.host != socket.gethostname() or not info.command.startswith("ebft run"):
            return None
        return info

    def signal_holder(self, stop_now: bool) -> None:
        import os
        import signal

        from ebft_tui.tui.screens.confirm import ConfirmScreen

        holder = self.holder() if self.attached else None
        if holder is None:
            self.notify("no launcher of ours runs this any more", severity="warning")
            return

        def answer(yes: bool | None) -> None:
            if not yes:
                return
            try:
                os.kill(holder.pid, signal.SIGKILL if stop_now else signal.SIGTERM)
            except ProcessLookupError:
                self.notify("that launcher has already gone")
                return
            if not stop_now:
                self.stopping_since(time.time())

        question = ("Stop now? Its launcher (pid {pid}) is killed and the run with it: the steps since the last "
                    "checkpoint are lost; starting it again resumes from that checkpoint." if stop_now else
                    "Stop this run? Its launcher (pid {pid}) is asked to stop it: the trainer finishes its step, "
                    "saves a checkpoint and exits. Press k meanwhile to stop at once.")
        self.app.push_screen(ConfirmScreen(question.format(pid=holder.pid), yes="Kill now" if stop_now else "Stop"),
                             answer)

    # ---- size, plots, search ------------------------------------------------------------------

    def on_resize(self, event: Resize) -> None:
        self.apply_size(event.size.width, event.size.height)

    def apply_size(self, width: int, height: int) -> None:
        compact = width < COMPACT_BELOW[0] or height < COMPACT_BELOW[1]
        if compact == self.compact and self.has_class("-compact") == compact:
            return
        self.compact = compact
        self.set_class(compact, "-compact")
        for card in self.query(MetricCard):
            card.set_compact(compact)

    @on(MetricCard.Open)
    def open_plot(self, message: MetricCard.Open) -> None:
        from ebft_tui.tui.screens.plot import PlotScreen

        keys = [k for k in CARD_KEYS if self.history.has(k)] or [message.key]

        def series_for(key: str) -> list:
            return [series_from(METRICS[key].label if key in METRICS else key, self.history.series(key))]

        self.plot_screen = PlotScreen(message.key, series_for, keys, subtitle=self.run_title)
        self.app.push_screen(self.plot_screen)

    def action_search(self) -> None:
        box = self.query_one("#log-search", Input)
        box.add_class("-shown")
        if self.query_one(TabbedContent).active == "tab-procs":
            self.action_tab("tab-trainer")
        box.focus()
        self.refresh_bindings()

    def action_close_search(self) -> None:
        box = self.query_one("#log-search", Input)
        box.remove_class("-shown")
        box.value = ""
        self.set_focus(None)
        self.refresh_bindings()

    @on(Input.Submitted, "#log-search")
    def _search_next(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        name = self.query_one(TabbedContent).active.removeprefix("tab-")
        try:
            pane = self.query_one(f"#log-{name}", LogPane)
        except Exception:
            self.notify("open a log tab (2, 3) to search it", severity="warning")
            return
        found = pane.find_next(text)
        if found is None:
            self.notify(f"{text!r} is not in the {name} log", severity="warning")
        else:
            index, total = found
            self.notify(f"{name} log: line {index + 1} ({total} match{'es' if total != 1 else ''})", timeout=2)

    def action_restart(self) -> None:
        self.app.action_restart_run()

    def action_toggle_follow(self) -> None:
        active = self.query_one(TabbedContent).active
        name = active.removeprefix("tab-")
        try:
            pane = self.query_one(f"#log-{name}", LogPane)
        except Exception:
            return
        following = pane.toggle_follow()
        self.notify(f"{name} log: {'following' if following else 'paused'}")

    def action_tab(self, tab: str) -> None:
        try:
            self.query_one(TabbedContent).active = tab
        except Exception:
            pass
