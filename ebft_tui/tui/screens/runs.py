"""The runs screen: past and live runs under the outputs folder; open one, compare two.

ctrl+r from any screen shows it (and brings you back to it). Enter opens the highlighted run
(followed live if it is still going, and then `s` / `k` ask its launcher to stop it or kill it);
space marks up to two runs and `c` compares
their curves on one plot per metric; `n` starts a new run from the presets.
"""

from __future__ import annotations

import time
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from ebft_tui.catalog import CARD_KEYS, METRICS
from ebft_tui.runs.index import RunSummary, list_runs, summarize
from ebft_tui.tui.widgets.metric_plot import PlotSeries, series_from

STATUS_STYLE = {"running": "green", "starting": "yellow", "stopping": "yellow", "finished": "cyan",
                "failed": "red", "stopped": "magenta"}


def last_text(run: RunSummary) -> str:
    parts = []
    for key, short in (("ebft/alignment", "align"), ("ebft/reward", "reward"), ("ebft/cfm_loss", "cfm")):
        if key in run.last:
            parts.append(f"{short} {METRICS[key].format(run.last[key])}")
    if not parts and "loss" in run.last:
        parts.append(f"loss {run.last['loss']:.4f}")
    return " · ".join(parts) or "-"


def started_text(ts: float | None) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(ts)) if ts else "-"


class RunsScreen(Screen):
    DEFAULT_CSS = """
    RunsScreen #runs-head { height: auto; padding: 0 1; color: $text-muted; }
    RunsScreen DataTable { height: 1fr; }
    """

    BINDINGS = [
        Binding("enter", "open", "Open", priority=True),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare marked"),
        Binding("n", "new", "New run"),
        Binding("f5", "reload", "Reload"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)
        self.runs: list[RunSummary] = []
        self.marked: list[Path] = []

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static(f"runs under {self.root.resolve()}", id="runs-head")
        yield DataTable(cursor_type="row", zebra_stripes=True, id="runs-table")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "ebft-tui"
        self.sub_title = "runs"
        table = self.query_one(DataTable)
        for key, label in (("mark", " "), ("name", "run"), ("preset", "preset"), ("mode", "mode"), ("steps", "steps"),
                           ("status", "status"), ("last", "last metrics"), ("started", "started")):
            table.add_column(label, key=key)
        self.action_reload()
        self.set_interval(5.0, self.action_reload)
        table.focus()

    def on_screen_resume(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        self.load_runs()

    @work(thread=True, exclusive=True, group="runs")
    def load_runs(self) -> None:
        runs = list_runs(self.root)
        self.app.call_from_thread(self.show_runs, runs)

    def show_runs(self, runs: list[RunSummary]) -> None:
        self.runs = runs
        table = self.query_one(DataTable)
        current = self.highlighted
        table.clear()
        for run in runs:
            style = STATUS_STYLE.get(run.status, "dim")
            status = f"[{style}]{run.status}[/]" + (" ●" if run.live else "")
            table.add_row("✓" if run.path in self.marked else " ", run.name, run.preset, run.mode, run.steps_text,
                          status, last_text(run), started_text(run.started), key=str(run.path))
        if current is not None:
            for i, run in enumerate(runs):
                if run.path == current.path:
                    table.move_cursor(row=i)
        head = self.query_one("#runs-head", Static)
        if not runs:
            head.update(f"no runs under {self.root.resolve()} yet: press n to start one")
        else:
            live = sum(r.live for r in runs)
            head.update(f"{len(runs)} run(s) under {self.root.resolve()}, {live} live · enter open · space mark · "
                        "c compare two")

    @property
    def highlighted(self) -> RunSummary | None:
        table = self.query_one(DataTable)
        if not self.runs or table.cursor_row is None or not 0 <= table.cursor_row < len(self.runs):
            return None
        return self.runs[table.cursor_row]

    def action_open(self) -> None:
        run = self.highlighted
        if run is None:
            return
        control = getattr(self.app, "run_control", None)
        screen = getattr(self.app, "run_screen", None)
        if (control is not None and screen is not None and Path(control.plan.run_dir).resolve() == run.path.resolve()
                and screen not in self.app.screen_stack):
            self.app.push_screen(screen)  # the run this app launched: its own screen, with stop keys
            return
        self.app.open_watch(run.path, attach=True)

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_mark(self) -> None:
        run = self.highlighted
        if run is None:
            return
        if run.path in self.marked:
            self.marked.remove(run.path)
        else:
            self.marked = (self.marked + [run.path])[-2:]
        table = self.query_one(DataTable)
        for r in self.runs:
            table.update_cell(str(r.path), "mark", "✓" if r.path in self.marked else " ")

    def action_compare(self) -> None:
        from ebft_tui.tui.screens.plot import PlotScreen

        if len(self.marked) != 2:
            self.notify("mark two runs with space first", severity="warning")
            return
        runs = [summarize(p) for p in self.marked]
        keys = [k for k in CARD_KEYS if any(r.history is not None and r.history.has(k) for r in runs)]
        if not keys:
            self.notify("those runs have no metrics to compare yet", severity="warning")
            return
        names = [r.name if r.name != runs[1 - i].name else str(r.path) for i, r in enumerate(runs)]

        def series_for(key: str) -> list[PlotSeries]:
            return [series_from(name, r.history.series(key)) for name, r in zip(names, runs)
                    if r.history is not None and r.history.has(key)]

        self.app.push_screen(PlotScreen(keys[0], series_for, keys, subtitle=" vs ".join(names)))

    def action_new(self) -> None:
        self.app.open_presets()

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
