"""Pilot tests of issue 16's points: run-dir lock from two launchers, stop with a checkpoint on a
slow fake trainer, global keys with a focused input, plots with 1 and 3 points, the runs screen
(open, compare), the 80x24 layout, Esc on an edited form, help groups, screenshot folder."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from textual.app import App
from textual.widgets import Footer, Input, TabbedContent

from ebft_tui.runs import lock
from ebft_tui.runs.plan import check_run_dir_free
from ebft_tui.tui.app import EbftApp, screenshot_dir
from ebft_tui.tui.screens.config_form import ConfigFormScreen
from ebft_tui.tui.screens.confirm import ChoiceScreen, ConfirmScreen
from ebft_tui.tui.screens.help import HelpScreen
from ebft_tui.tui.screens.plot import PlotScreen
from ebft_tui.tui.screens.presets import PresetsScreen
from ebft_tui.tui.screens.run import RunScreen
from ebft_tui.tui.screens.runs import RunsScreen
from ebft_tui.tui.widgets.metric_card import MetricCard
from ebft_tui.tui.widgets.metric_plot import MetricPlot, PlotSeries

from .test_app import (FIELDS, SIZE, _alive, assert_all_dead, child_pids, fake_validator, no_leftovers,  # noqa: F401
                       preset, trainer_plan, wait_for, write_finished_run)

pytestmark = pytest.mark.timeout(120)


def screen_text(app: App) -> str:
    """The screen as plain text (what `export_screenshot` renders, without the SVG)."""
    import io

    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, record=True,
                      legacy_windows=False, safe_box=False, color_system=None)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


# ---------------------------------------------------------------- run-dir lock, earlier runs
async def test_a_run_dir_held_by_another_launcher_offers_watch_or_a_new_folder(tmp_path, preset):
    run_dir = tmp_path / "outputs" / "tiny"
    write_finished_run(run_dir, [0.3, 0.4])
    lock.acquire(run_dir, command="ebft run --headless tiny")  # another launcher (this live process)
    asked: list[Path | None] = []

    def plan_factory(config, overrides, gpus, run_dir=None, fresh=False):
        target = Path(run_dir) if run_dir is not None else tmp_path / "outputs" / "tiny"
        asked.append(run_dir)
        check_run_dir_free(target)  # what build_plan does before writing anything
        return trainer_plan(target, steps=2)

    app = EbftApp(presets=[preset], schema=lambda: FIELDS, validator=fake_validator, list_gpus=lambda: [],
                  plan_factory=plan_factory, install_signal_handlers=False)
    try:
        async with app.run_test(size=SIZE) as pilot:
            app.choose_gpus(preset, [], {"ebft": {"mode": "strided"}})
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "GpuPickerScreen", what="the picker")
            await pilot.pause(0.2)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the lock question")
            question = str(app.screen.query_one("#choice-question").content)
            assert f"pid {os.getpid()}" in question and "in use" in question
            await pilot.press("w")  # watch the run that holds it
            await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), what="the watch view")
            assert app.screen.readonly and app.screen.run_dir == run_dir and app.run_control is None
            app.pop_screen()
            app.choose_gpus(preset, [], {"ebft": {"mode": "strided"}})
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "GpuPickerScreen", what="the picker")
            await pilot.pause(0.2)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the lock question")
            await pilot.press("n")  # a new folder beside it
            await wait_for(pilot, lambda: isinstance(app.screen, RunScreen) and not app.screen.readonly,
                           what="the new run")
            assert asked[-1] == run_dir.with_name("tiny-2") and app.screen.run_dir == run_dir.with_name("tiny-2")
            await wait_for(pilot, lambda: app.screen.finished is not None, what="the new run to end")
            assert lock.live_holder(run_dir).pid == os.getpid()  # the other launcher's lock untouched
    finally:
        lock.release(run_dir)


async def test_an_earlier_run_offers_resume_new_folder_or_overwrite(tmp_path, preset):
    run_dir = tmp_path / "outputs" / "tiny"
    write_finished_run(run_dir, [0.3, 0.4])
    calls: list[dict] = []

    def plan_factory(config, overrides, gpus, **kw):
        calls.append(kw)
        return trainer_plan(Path(kw.get("run_dir") or run_dir), steps=1)

    app = EbftApp(presets=[preset], schema=lambda: FIELDS, validator=fake_validator, list_gpus=lambda: [],
                  plan_factory=plan_factory, install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        app.choose_gpus(preset, [], {"ebft": {"mode": "strided"}})
        await pilot.pause(0.3)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the earlier-run question")
        assert "earlier run" in str(app.screen.query_one("#choice-question").content)
        await pilot.press("o")  # overwrite asks again before deleting anything
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the overwrite confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), what="the run")
        assert calls[-1] == {"run_dir": run_dir, "fresh": True}
        await wait_for(pilot, lambda: app.screen.finished is not None, what="the run to end")


# ------------------------------------------------------------ stop keeps its word (TUI)
async def test_stop_shows_the_countdown_and_waits_for_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    app = EbftApp(plan=trainer_plan(run_dir, steps=4, interval=6, extra=("--graceful", "--phases")),
                  install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen: RunScreen = app.screen
        progress = screen.query_one("RunProgress")
        # the phase within the step and its elapsed time, from the trainer's `phase` records
        await wait_for(pilot, lambda: re.search(r"(generating|scoring|training)( step \d+)? · \d+:\d\d",
                                                progress.eta_text), what="a phase with its elapsed time")
        assert screen.check_action("kill", ()) is False  # "stop now" only once a stop is under way
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the stop confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: re.search(r"stopping: finishing step \d+ and a checkpoint · \d+:\d\d",
                                                str(screen.query_one("#run-state").content)),
                       what="the stop countdown")
        assert "k: stop now" in str(screen.query_one("#run-state").content)
        assert screen.check_action("kill", ()) is True
        await wait_for(pilot, lambda: screen.finished is not None, timeout=60, what="the graceful stop")
        await pilot.pause()
        state = str(screen.query_one("#run-state").content)
        assert "stopped (exit 143)" in state and re.search(r"checkpoints/step-\d{6}", state)
        eta = screen.query_one("RunProgress").eta_text
        assert "ETA" not in eta and "stopped" in eta  # no stale ETA or phase after the stop
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")
    assert app.return_value == 130


async def test_stop_now_kills_during_a_slow_step(tmp_path):
    run_dir = tmp_path / "run"
    app = EbftApp(plan=trainer_plan(run_dir, steps=2, interval=60, extra=("--graceful",)),
                  install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen: RunScreen = app.screen
        await wait_for(pilot, lambda: (run_dir / "report.json").exists(), what="the trainer")
        pids = child_pids(run_dir)
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the stop confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.stop_since is not None, what="the stop")
        await pilot.pause(0.5)
        assert all(_alive(p) for p in pids)  # still finishing its 60 s step
        await pilot.press("k")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the kill confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.finished is not None, what="the kill")
        assert "killed (exit 137)" in str(screen.query_one("#run-state").content)
    assert_all_dead(pids)


# ------------------------------------------------------------------------- global keys
async def test_global_keys_work_with_a_text_field_focused(tmp_path, preset):
    app = EbftApp(presets=[preset], schema=lambda: FIELDS, validator=fake_validator, list_gpus=lambda: [],
                  install_signal_handlers=False, runs_root=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        presets = app.screen
        assert isinstance(presets, PresetsScreen) and isinstance(app.focused, Input)
        await pilot.press("question_mark")  # a character: it goes to the focused filter
        assert presets.query_one("#preset-filter", Input).value == "?"
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="help over the filter")
        await pilot.press("escape")
        await pilot.press("backspace")
        # Enter is in the footer although the filter has focus.
        assert any(b.key == "enter" for _, b, _, _ in [v for v in presets.active_bindings.values()])
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigFormScreen), what="the parameter editor")
        form: ConfigFormScreen = app.screen
        await wait_for(pilot, lambda: form.ready, what="the form")
        field = form.rows["base_model"].editor
        field.focus()
        field.value = ""
        await pilot.press(*"a/b")  # "/" types into the field, it does not jump to the find box
        assert field.value == "a/b" and app.focused is field
        await pilot.press("ctrl+f")
        assert app.focused is form.query_one("#form-filter")
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="help over the form")
        help_screen = app.screen
        titles = [title for title, rows in help_screen.groups if rows]
        assert titles == ["This screen", "Everywhere", "Text fields"]
        here = dict(help_screen.groups[0][1])
        assert any("Find field" in d for d in here.values()) and any("Start" in d for d in here.values())
        assert any("Runs" in d for _, d in help_screen.groups[1][1])
        await pilot.press("escape")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen), what="the runs screen")


async def test_esc_on_an_edited_form_asks_first(tmp_path, preset):
    app = EbftApp(presets=[preset], schema=lambda: FIELDS, validator=fake_validator, list_gpus=lambda: [],
                  install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigFormScreen), what="the parameter editor")
        form: ConfigFormScreen = app.screen
        await wait_for(pilot, lambda: form.ready, what="the form")
        form.rows["max_steps"].editor.value = "9"
        await pilot.pause()
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the drop-edits question")
        assert "max_steps" in app.screen.question
        await pilot.press("n")  # keep editing
        await pilot.pause()
        assert app.screen is form and form.overrides() == ["max_steps=9"]
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the drop-edits question")
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, PresetsScreen), what="the presets")


# ------------------------------------------------------------------------------- plots
class PlotApp(App):
    CSS = "MetricPlot { height: 12; width: 60; }"

    def compose(self):
        yield MetricPlot(id="one")
        yield MetricPlot(id="three")


async def test_plots_with_one_and_three_points():
    app = PlotApp()
    async with app.run_test(size=(70, 30)) as pilot:
        app.query_one("#one", MetricPlot).show([PlotSeries("a", [7.0], [0.42])])
        app.query_one("#three", MetricPlot).show([PlotSeries("a", [1.0, 2.0, 3.0], [0.5, 0.2, 0.9])])
        await pilot.pause()
        one = app.query_one("#one", MetricPlot).text_lines()
        marker_rows = [ln for ln in one if "●" in ln]
        assert len(marker_rows) == 1 and marker_rows[0].lstrip().startswith("0.4")  # one point, at its value
        assert one[-2].split() == ["7"] and "step" in one[-1]  # one step tick: its step
        three = app.query_one("#three", MetricPlot).text_lines()
        assert three[-2].split() == ["1", "2", "3"]
        plot_rows = [ln for ln in three if "┤" in ln]
        labels = [float(ln.split("┤")[0]) for ln in plot_rows]
        assert min(labels) <= 0.2 + 0.1 and max(labels) >= 0.9 - 0.1
        drawn = [ln.split("┤")[1] for ln in plot_rows]
        lowest = drawn[labels.index(min(labels))]
        assert lowest.strip("│ "), "the lowest value is drawn, not blank"
        assert all(row.strip("│ ") for row in drawn[1:-1]) or sum(bool(r.strip("│ ")) for r in drawn) >= 5


async def test_a_card_opens_its_plot_full_screen(tmp_path):
    run_dir = tmp_path / "old-run"
    write_finished_run(run_dir, [0.2, 0.3, 0.35])
    app = EbftApp(watch_dir=run_dir, install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: screen.history.step == 3, what="the history")
        card = screen.card("ebft/alignment")
        card.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PlotScreen), what="the full-screen plot")
        plot = app.screen.query_one(MetricPlot)
        assert plot.series[0].values == pytest.approx([0.2, 0.3, 0.35]) and plot.series[0].steps == [1, 2, 3]
        assert "want ↑" in app.screen.sub_title
        await pilot.press("right")
        assert app.screen.key == "ebft/diversity"
        await pilot.press("escape")
        assert app.screen is screen


# --------------------------------------------------------------------------- runs screen
async def test_runs_screen_opens_and_compares_two_runs(tmp_path):
    root = tmp_path / "outputs"
    write_finished_run(root / "run-a", [0.2, 0.3, 0.4])
    write_finished_run(root / "run-b", [0.1, 0.15])
    (root / "run-a" / "config.yaml").write_text("# resolved by ebft from /x/presets/tiny-strided.yaml\nmax_steps: 3\n")
    (root / "not-a-run").mkdir()
    app = EbftApp(show_runs=True, runs_root=root, install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        runs = app.screen
        assert isinstance(runs, RunsScreen)
        await wait_for(pilot, lambda: len(runs.runs) == 2, what="the runs")
        a = next(r for r in runs.runs if r.name == "run-a")
        assert a.preset == "tiny-strided" and a.steps_text == "3/3" and a.status == "finished"
        assert a.last["ebft/alignment"] == pytest.approx(0.4)
        table = runs.query_one("DataTable")
        table.move_cursor(row=runs.runs.index(a))
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), what="the run")
        assert app.screen.run_dir == root / "run-a" and app.screen.readonly
        await wait_for(pilot, lambda: app.screen.history.step == 3, what="its history")
        await pilot.press("ctrl+r")  # back to the runs from a finished run
        await wait_for(pilot, lambda: app.screen is runs, what="the runs screen again")
        for i in range(2):
            table.move_cursor(row=i)
            await pilot.press("space")
        await pilot.press("c")
        await wait_for(pilot, lambda: isinstance(app.screen, PlotScreen), what="the comparison")
        plot = app.screen.query_one(MetricPlot)
        assert sorted(s.label for s in plot.series) == ["run-a", "run-b"]
        by_label = {s.label: s.values for s in plot.series}
        assert by_label["run-a"] == pytest.approx([0.2, 0.3, 0.4]) and by_label["run-b"] == pytest.approx([0.1, 0.15])
        assert "run-a" in app.screen.sub_title and "run-b" in app.screen.sub_title


# ------------------------------------------------------------------------ 80x24 layout
async def test_run_screen_fits_80x24(tmp_path):
    run_dir = tmp_path / "old-run"
    write_finished_run(run_dir, [0.2, 0.12, 0.08, 0.05])
    app = EbftApp(watch_dir=run_dir, install_signal_handlers=False)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: screen.history.step == 4, what="the history")
        await pilot.pause(0.3)
        assert screen.has_class("-compact")
        assert all(not card.query_one(MetricPlot).display for card in screen.query(MetricCard))
        regions = {name: screen.query_one(sel).region for name, sel in (
            ("state", "#run-state"), ("progress", "RunProgress"), ("cards", "#cards"), ("hints", "#hints"),
            ("tabs", TabbedContent), ("footer", Footer))}
        for name, r in regions.items():
            assert r.height > 0 and r.y >= 0 and r.y + r.height <= 24, (name, r)
        assert regions["footer"].y == 23
        assert regions["tabs"].height >= 5  # the log keeps room: tab bar plus lines
        order = [regions[n].y for n in ("state", "progress", "cards", "hints", "tabs", "footer")]
        assert order == sorted(order)
        lines = screen_text(app).splitlines()
        assert len(lines) == 24 and max(len(ln) for ln in lines) <= 80
        text = "\n".join(lines)
        for seen in ("alignment", "diversity", "grad norm", "step 4/4", "trainer log", "hints"):
            assert seen in text, seen
        assert "Follow log" in lines[-1] and "Stop" not in lines[-1]  # footer keys; read-only: no stop
        assert "+0.050…+0.200" in text  # a compact card's range, whole
    # and a roomy terminal gets the plots back
    app = EbftApp(watch_dir=run_dir, install_signal_handlers=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: app.screen.history.step == 4, what="the history")
        assert not app.screen.has_class("-compact")
        assert app.screen.card("ebft/alignment").query_one(MetricPlot).display


# --------------------------------------------------------------------------- screenshots
async def test_screenshot_falls_back_to_the_run_dir(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_downloads_path", lambda: tmp_path / "no-Downloads-here")
    run_dir = tmp_path / "old-run"
    write_finished_run(run_dir, [0.2, 0.3])
    app = EbftApp(watch_dir=run_dir, install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.history.step == 2, what="the history")
        assert screenshot_dir(app.screen) == run_dir
        app.action_screenshot()
        await wait_for(pilot, lambda: list(run_dir.glob("*.svg")), what="the screenshot file")
        await wait_for(pilot, lambda: any(str(run_dir) in str(n.message) for n in app._notifications),
                       what="a notification naming the folder")


async def test_a_run_reopened_from_the_runs_screen_can_be_stopped_there(tmp_path):
    """A headless launcher runs a slow graceful fake trainer; the runs screen opens it attached,
    and `s` asks that launcher to stop: the step finishes, a checkpoint, status stopped."""
    import subprocess
    import sys

    from .test_lock import HEADLESS, REPO

    root = tmp_path / "outputs"
    script = tmp_path / "launch.py"
    script.write_text(HEADLESS.format(tests=str(REPO / "tests"), run_dir=str(root / "live"))
                      .replace('"--steps", "1", "--hang", "--graceful"', '"--steps", "5", "--interval", "2", "--graceful"'))
    launcher = subprocess.Popen([sys.executable, str(script), "t.json"], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (root / "live" / "t.json").exists():
            assert time.monotonic() < deadline, "the headless run did not start"
            time.sleep(0.05)
        trainer = json.loads((root / "live" / "t.json").read_text())["pid"]
        app = EbftApp(show_runs=True, runs_root=root, install_signal_handlers=False)
        async with app.run_test(size=SIZE) as pilot:
            runs = app.screen
            await wait_for(pilot, lambda: len(runs.runs) == 1 and runs.runs[0].live, what="the live run")
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), what="the attached run")
            screen = app.screen
            assert screen.attached and screen.check_action("stop", ()) is True
            await pilot.press("s")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the stop question")
            assert f"pid {launcher.pid}" in app.screen.question
            await pilot.press("y")
            await wait_for(pilot, lambda: screen.watch_status == "stopped", timeout=60, what="the stopped run")
            assert screen.check_action("stop", ()) is False  # nobody left to signal
        assert launcher.wait(30) == 128 + signal.SIGTERM  # headless: a SIGTERM'd launcher's code
        recs = [json.loads(ln) for ln in (root / "live" / "metrics.jsonl").read_text().splitlines()]
        assert any(r["event"] == "checkpoint" for r in recs) and recs[-1]["phase"] == "stopped"
        assert not _alive(trainer)
    finally:
        launcher.kill()
