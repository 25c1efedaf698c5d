"""The run screen: metric cards, progress, hints, the process table and the children's logs.

Data flows one way. A 4 Hz timer reads what the files gained (`metrics.jsonl`, `trainer.log`,
`server.log`) and posts `MetricsBatch` / `LogLines`; a 1 s timer hands the supervisor's process
states to a thread worker that samples CPU/RAM/GPU memory and posts `ResourceSample`. Handlers
fold the data into `MetricHistory` and the widgets re-render from it.

The screen only shows a run; starting, stopping and restarting the children is the app's job
(`EbftApp.run_control`), so a quit or a signal can stop them whatever screen is on top. In watch
mode (`readonly`) there is no supervisor and the stop/restart keys are off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from textual.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from ebft_tui.catalog import METRICS, healthy_range
from ebft_tui.metrics.evals import eval_lines
from ebft_tui.metrics.history import MetricHistory
from ebft_tui.overrides import get_path
from ebft_tui.runs.layout import RunDir
from ebft_tui.runs.tail import JsonlFollower, TextFollower
from ebft_tui.tui.messages import (LogLines, MetricsBatch, ProcRow, ResourceSample, RunFinished,
                                   RunEvent)
from ebft_tui.tui.widgets.log_pane import LogPane
from ebft_tui.tui.widgets.metric_card import MetricCard, range_text
from ebft_tui.tui.widgets.process_table import ProcessTable
from ebft_tui.tui.widgets.progress import RunProgress

CARD_KEYS = ["ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "grad_norm", "entropy"]
POLL_S = 0.25
SAMPLE_S = 1.0
MAX_HINTS = 6


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
    """

    BINDINGS = [
        Binding("s", "stop", "Stop run"),
        Binding("r", "restart", "Restart"),
        Binding("f", "toggle_follow", "Follow log"),
        Binding("1", "tab('tab-procs')", "Processes", show=False),
        Binding("2", "tab('tab-trainer')", "Trainer log", show=False),
        Binding("3", "tab('tab-server')", "Server log", show=False),
    ]

    def __init__(self, run_dir: Path, log_paths: dict[str, Path], *, readonly: bool = False,
                 title: str = "", config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.log_paths = {name: Path(p) for name, p in log_paths.items()}
        self.readonly = readonly
        self.run_title = title or self.run_dir.name
        cfg = config if config is not None else read_run_config(self.run_dir)
        self.history = MetricHistory(whitening=bool(get_path(cfg, "ebft.use_whitening", False)))
        self.metrics_follower = JsonlFollower(self.run_dir / "metrics.jsonl")
        self.log_followers = {name: TextFollower(p) for name, p in self.log_paths.items()}
        self.state_text = "watching (read-only)" if readonly else "starting…"
        self.extra_hints: list[str] = []
        self.finished: RunFinished | None = None
        self.n_batches = 0

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
        self.query_one(RunProgress).show(h.step, h.max_steps, h.eta_seconds(), h.phase)
        self.render_hints()
        self.render_evals()

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
        state = RunDir(self.run_dir).read_state()
        if not state:
            return
        procs = state.get("processes") or []
        rows = [ProcRow(name=str(p.get("name", "?")), state=str(p.get("state", "?")), pid=p.get("pid"),
                        returncode=p.get("returncode")) for p in procs if isinstance(p, dict)]
        self.show_processes(rows)
        self.set_state(f"watching (read-only) · {state.get('status', '?')}"
                       + (f" · {describe_states(rows)}" if rows else ""))

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
        if control is not None:
            self.set_state(describe_states(control.states()))
        if getattr(event, "kind", None) == "failed":
            self.add_hint(f"[b red]{escape(describe_event(event))}[/]{_tail_text(event)}")

    @on(RunFinished)
    def run_finished(self, message: RunFinished) -> None:
        self.finished = message
        self.poll_files()  # the last records
        if message.launch_error:
            self.set_state(f"launch failed: {message.launch_error}".splitlines()[0][:200])
        elif message.stopped_by_user:
            self.set_state("stopped")
        elif message.returncode == 0:
            self.set_state("finished ✓ (exit 0)")
        else:
            self.set_state(f"failed (exit {message.returncode})")
        self.refresh_bindings()

    # ---- keys ---------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("stop", "restart"):
            if self.readonly:
                return None  # hidden: watch mode never signals a run
            control = getattr(self.app, "run_control", None)
            if action == "stop" and (control is None or not control.alive):
                return False
        return True

    def action_stop(self) -> None:
        self.app.action_stop_run()

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
