"""Pilot tests of the ebft-tui app with real child processes (tests/fakes) writing metrics.jsonl.

The launch flow is driven through the screens as a user would: filter the preset list, open the
editor, type an invalid value (the message shows, Start is disabled), fix it, start on the CPU,
watch the cards fill with the right arrows, stop, quit; afterwards no child PID may survive. The
engine is replaced by a small schema and validator (the engine bridge has its own tests); the
supervisor, the followers and the processes are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from ebft_tui.engine import ValidationResult
from ebft_tui.presets import PresetInfo
from ebft_tui.runs.plan import LaunchPlan, ProcessSpec
from ebft_tui.system.gpus import GpuInfo
from ebft_tui.tui.app import EbftApp
from ebft_tui.tui.messages import MetricsBatch
from ebft_tui.tui.screens.config_form import ConfigFormScreen, override_item, parse_text
from ebft_tui.tui.screens.confirm import ChoiceScreen, ConfirmScreen
from ebft_tui.tui.screens.gpu_picker import GpuPickerScreen
from ebft_tui.tui.screens.presets import PresetsScreen
from ebft_tui.tui.screens.run import RunScreen
from ebft_tui.tui.widgets.metric_card import MetricCard
from ebft_tui.tui.widgets.metric_plot import MetricPlot
from ebft_tui.tui.widgets.process_table import ProcessTable

pytestmark = pytest.mark.timeout(120)

FAKES = Path(__file__).resolve().parents[1] / "fakes"
SIZE = (120, 40)

FIELDS = [
    {"key": "base_model", "section": "model", "type": "str", "default": None, "description": "hub id or folder"},
    {"key": "max_steps", "section": "training", "type": "int", "default": 10, "min": 1, "description": "optimizer steps"},
    {"key": "learning_rate", "section": "training", "type": "float", "default": 1e-5, "min": 0, "description": "peak LR"},
    {"key": "ebft.mode", "section": "ebft", "type": "enum", "default": "structured",
     "choices": ["structured", "strided"], "description": "rollout mode"},
    {"key": "ebft.stride", "section": "ebft", "type": "int", "default": 8, "min": 1, "description": "tokens between anchors"},
    {"key": "ebft.use_whitening", "section": "ebft", "type": "bool", "default": False, "description": "SVD whitening"},
    {"key": "ebft.feature_layers", "section": "ebft", "type": "list", "default": [0.25, 0.5, 0.75],
     "description": "layers as fractions of depth"},
]

PRESET_YAML = """\
# description: a tiny strided run for tests
# gpus: 1
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
max_steps: 6
ebft:
  mode: strided
  stride: 8
  use_whitening: false
"""


def fake_validator(path: Path, overrides: list[str]) -> ValidationResult:
    """Like `ebft_engine validate`: problems keyed by field; stride must be <= 64 here."""
    problems = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "ebft.stride" and int(value) > 64:
            problems.append(("ebft.stride", "stride must be at most 64 (the context it needs per block)"))
    return ValidationResult(ok=not problems, problems=problems, config={"ebft": {"mode": "strided"}})


def trainer_plan(run_dir: Path, steps: int = 6, interval: float = 0.05, extra: tuple[str, ...] = ()) -> LaunchPlan:
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(FAKES / "fake_trainer.py"), "--out", str(run_dir), "--steps", str(steps),
            "--interval", str(interval), "--report", str(run_dir / "report.json"), *extra]
    spec = ProcessSpec("trainer", argv, {"CUDA_VISIBLE_DEVICES": ""}, run_dir / "trainer.log")
    return LaunchPlan(run_dir, "strided", [spec], None, [])


async def wait_for(pilot, cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def child_pids(run_dir: Path) -> list[int]:
    report = json.loads((run_dir / "report.json").read_text())
    return [p for p in (report["pid"], report.get("grandchild")) if p]


def assert_all_dead(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.05)
    assert not alive, f"child processes survived: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path):
    """A failing test must not leave its fake children running: kill their groups afterwards."""
    yield
    for report in tmp_path.rglob("report.json"):
        try:
            os.killpg(json.loads(report.read_text())["pgid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


@pytest.fixture
def preset(tmp_path: Path) -> PresetInfo:
    path = tmp_path / "tiny-strided.yaml"
    path.write_text(PRESET_YAML)
    return PresetInfo("tiny-strided", path, "strided", "HuggingFaceTB/SmolLM2-135M-Instruct", 1,
                      "a tiny strided run for tests")


@pytest.fixture
def other_preset(tmp_path: Path) -> PresetInfo:
    path = tmp_path / "qwen-structured.yaml"
    path.write_text("base_model: Qwen/Qwen3-4B\nebft:\n  mode: structured\n")
    return PresetInfo("qwen-structured", path, "structured", "Qwen/Qwen3-4B", 2, "two-GPU structured")


async def test_pick_edit_start_watch_stop_quit(tmp_path, preset, other_preset):
    run_dir = tmp_path / "run"
    plans: list[tuple] = []

    def plan_factory(config, overrides, gpus, **kw):
        plans.append((Path(config), list(overrides), list(gpus)))
        return trainer_plan(run_dir, steps=6, extra=("--hang", "--grandchild"))

    batches: list[MetricsBatch] = []
    app = EbftApp(presets=[other_preset, preset], schema=lambda: FIELDS, validator=fake_validator,
                  list_gpus=lambda: [], plan_factory=plan_factory, install_signal_handlers=False)

    def hook(message):
        if isinstance(message, MetricsBatch):
            batches.append(message)

    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        # 1. The preset picker: typing filters, the preview shows the highlighted preset's YAML.
        assert isinstance(app.screen, PresetsScreen)
        assert [p.name for p in app.screen.shown] == ["qwen-structured", "tiny-strided"]
        await pilot.press(*"tiny")
        assert [p.name for p in app.screen.shown] == ["tiny-strided"]
        assert "stride: 8" in app.screen.preview_text
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfigFormScreen), what="the parameter editor")
        form: ConfigFormScreen = app.screen
        start = form.query_one("#start")

        # 2. The editor is pre-filled from the preset and valid once the engine answered.
        await wait_for(pilot, lambda: form.ready, what="the fields and the first validation")
        assert form.rows["max_steps"].editor.value == "6"
        assert form.rows["learning_rate"].editor.value == ""  # not in the preset: default as placeholder
        assert not start.disabled and form.n_problems == 0

        # 3. A value of the wrong type: the message shows next to the field, Start is disabled.
        stride = form.rows["ebft.stride"]
        stride.editor.focus()
        stride.editor.value = ""
        await pilot.press(*"abc")
        await pilot.pause()
        assert stride.has_class("-invalid")
        assert "whole number" in str(stride.query_one(".field-error").content)
        assert start.disabled and "1 problem" in str(form.query_one("#form-status").content)

        # 4. A value the engine refuses: its message lands on the field, Start stays disabled.
        stride.editor.value = "100"
        await pilot.pause()
        await wait_for(pilot, lambda: not form.pending, what="the engine's verdict")
        assert "at most 64" in str(stride.query_one(".field-error").content)
        assert start.disabled

        # 5. Fixed: valid again, only the changed field becomes an override.
        stride.editor.value = "16"
        await pilot.pause()
        await wait_for(pilot, lambda: not form.pending and not start.disabled, what="a valid form")
        assert not stride.has_class("-invalid")
        assert form.overrides() == ["ebft.stride=16"]

        # 6. Start -> GPU picker: no GPU on this machine, so it says the run uses the CPU, and as
        # the preset is made for a GPU, what that means; the focus is on Cancel, not Launch.
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, GpuPickerScreen), what="the GPU picker")
        picker = app.screen
        await wait_for(pilot, lambda: picker.gpus is not None, what="the GPU list")
        text = str(picker.query_one("#gpu-none").content)
        assert "this run will use the CPU" in text and "made for 1 GPU(s)" in text and "*-cpu preset" in text
        assert app.focused is picker.query_one("#cancel")
        assert "anyway" in str(picker.query_one("#launch").label)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), what="the run screen")
        assert plans == [(preset.path, ["ebft.stride=16"], [])]

        # 7. Cards fill from the fake trainer's metrics.jsonl, with arrows in the desired sense.
        screen: RunScreen = app.screen
        await wait_for(pilot, lambda: screen.history.step == 6 and screen.history.phase == "done",
                       what="all six steps")
        await pilot.pause()
        assert batches, "no MetricsBatch message was posted"
        align = screen.card("ebft/alignment")
        assert align.last == pytest.approx(0.2 + 0.05 * 6)
        assert align.arrow == "↑" and align.query_one(".card-arrow").has_class("-with")
        assert "+0.500" in str(align.query_one(".card-value").content)
        diversity = screen.card("ebft/diversity")
        assert diversity.arrow == "↓" and diversity.query_one(".card-arrow").has_class("-with")
        cfm = screen.card("ebft/cfm_loss")
        assert cfm.arrow == "↓" and cfm.has_class("-good")
        assert screen.card("entropy").arrow == "→"
        assert screen.card("grad_norm").arrow == "↑"
        assert all(card.last is not None for card in screen.query(MetricCard))
        assert "step 6/6" in str(screen.query_one("#progress-step").content)

        # 8. The process table lists the trainer with its PID.
        pids = child_pids(run_dir)
        await wait_for(pilot, lambda: "trainer" in screen.query_one(ProcessTable).rows_by_name,
                       what="the process table")
        assert screen.query_one(ProcessTable).rows_by_name["trainer"].pid == pids[0]
        assert all(_alive(p) for p in pids)

        # 9. Stop asks first; "n" keeps the run going, "y" stops it.
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the stop confirmation")
        await pilot.press("n")
        await pilot.pause()
        assert app.run_control.alive
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the stop confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.finished is not None, what="the run to stop")
        assert "stopped" in str(screen.query_one("#run-state").content)
        assert not app.run_control.alive

        # 10. Quit: nothing runs any more, so no question.
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")
    assert app.return_value == 130  # a run the user stopped
    assert_all_dead(pids)


async def test_quit_while_running_confirms_then_stops_children(tmp_path):
    run_dir = tmp_path / "run"
    app = EbftApp(plan=trainer_plan(run_dir, steps=3, extra=("--hang", "--grandchild")),
                  install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: (run_dir / "report.json").exists() and screen.history.step == 3,
                       what="the trainer's steps")
        pids = child_pids(run_dir)
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the quit question")
        await pilot.press("escape")  # changed my mind
        await pilot.pause()
        assert app.is_running and all(_alive(p) for p in pids)
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the quit question")
        await pilot.press("s")  # stop it & quit
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")
    assert_all_dead(pids)
    assert not (run_dir / "launcher.lock").exists()  # the keeper let go of the run dir


async def test_quit_can_leave_the_run_going_and_watch_follows_it(tmp_path):
    """Leave it running: the keeper carries on without the app, holds the run dir, and a SIGTERM
    to it (what stopping a detached run means) stops the run the graceful way."""
    from ebft_tui.runs.lock import live_holder

    run_dir = tmp_path / "run"
    app = EbftApp(plan=trainer_plan(run_dir, steps=2, extra=("--hang", "--grandchild")),
                  install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: (run_dir / "report.json").exists() and screen.history.step == 2,
                       what="the trainer's steps")
        pids = child_pids(run_dir)
        keeper = app.run_control.keeper_pid
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the quit question")
        await pilot.press("l")
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")
    assert app.return_value == 0 and app.detached_run == run_dir
    try:
        await asyncio.sleep(0.5)
        assert all(_alive(p) for p in [keeper, *pids]), "leaving the run going stopped it"
        holder = live_holder(run_dir)
        assert holder is not None and holder.pid == keeper
        os.kill(keeper, signal.SIGTERM)
        assert_all_dead([*pids, keeper], timeout=20)
        assert json.loads((run_dir / "state.json").read_text())["status"] == "stopped"
        assert not (run_dir / "launcher.lock").exists()
    finally:
        for p in [keeper, *pids]:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


async def test_restart_replaces_the_children(tmp_path):
    run_dir = tmp_path / "run"
    app = EbftApp(plan=trainer_plan(run_dir, steps=2, extra=("--hang", "--grandchild")),
                  install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: (run_dir / "report.json").exists() and screen.history.step == 2,
                       what="the trainer's steps")
        first = child_pids(run_dir)
        (run_dir / "report.json").unlink()
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the restart confirmation")
        await pilot.press("y")
        await wait_for(pilot, lambda: (run_dir / "report.json").exists(), what="the new trainer")
        second = child_pids(run_dir)
        assert set(first).isdisjoint(second)
        assert_all_dead(first)
        assert app.run_control.alive and screen.finished is None
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the quit question")
        await pilot.press("s")
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")
    assert_all_dead(second)


async def test_sigterm_stops_children_then_exits(tmp_path):
    run_dir = tmp_path / "run"
    app = EbftApp(plan=trainer_plan(run_dir, steps=2, extra=("--hang", "--grandchild")))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: (run_dir / "report.json").exists() and app.screen.history.step == 2,
                       what="the trainer's steps")
        pids = child_pids(run_dir)
        assert signal.SIGTERM in app._signals, "the app installed no SIGTERM handler"
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a dropped SSH session (SIGHUP) would
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")
    assert app.return_value == 128 + signal.SIGTERM
    assert_all_dead(pids)


async def test_run_ends_on_its_own_and_nan_is_counted(tmp_path):
    run_dir = tmp_path / "run"
    app = EbftApp(plan=trainer_plan(run_dir, steps=5, extra=("--nan-at", "5")), install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: screen.finished is not None, what="the trainer to finish")
        await pilot.pause()
        cfm = screen.card("ebft/cfm_loss")  # the last value was null: shown as nan, red, counted
        assert "1 NaN" in str(cfm.query_one(".card-foot").content)
        assert str(cfm.query_one(".card-value").content) == "nan" and cfm.has_class("-bad")
        plotted = cfm.query_one(MetricPlot).series[0]  # the NaN of step 5 is counted, not drawn
        assert plotted.values == pytest.approx([4.9, 4.8, 4.7, 4.6]) and plotted.steps == [1, 2, 3, 4]
        assert "finished" in str(screen.query_one("#run-state").content)
        assert screen.query_one("#log-trainer").total_lines >= 5  # the trainer's stdout, followed
        await pilot.press("ctrl+q")  # no run alive: exits at once
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")
    assert app.return_value == 0


async def test_crashing_trainer_shows_error_hint_and_exit_code(tmp_path):
    run_dir = tmp_path / "run"
    app = EbftApp(plan=trainer_plan(run_dir, steps=5, extra=("--crash-after", "2", "--exit-code", "3")),
                  install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await wait_for(pilot, lambda: screen.finished is not None, what="the crash")
        await pilot.pause()
        assert "failed (exit 3)" in str(screen.query_one("#run-state").content)
        hints = str(screen.query_one("#hints").content)
        assert "fake crash" in hints and screen.query_one("#hints").has_class("-shown")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")
    assert app.return_value == 3


async def test_server_that_dies_before_ready_fails_fast_with_its_log(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    server = ProcessSpec("server", [sys.executable, str(FAKES / "fake_server.py"), "--port", "1",
                                    "--exit-early", "7"], {}, run_dir / "server.log",
                         ready_url="http://127.0.0.1:1/health", ready_timeout_s=600)
    plan = trainer_plan(run_dir)
    plan.processes.insert(0, server)
    plan.mode = "structured"
    app = EbftApp(plan=plan, install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        # the 600 s readiness deadline is far beyond this wait: only the server's exit ends it
        await wait_for(pilot, lambda: screen.finished is not None, what="the launch failure")
        await pilot.pause()
        assert "launch failed" in str(screen.query_one("#run-state").content)
        assert screen.query_one("#hints").has_class("-shown")
        assert [p.id for p in screen.query("LogPane")] == ["log-trainer", "log-server"]
        assert not (run_dir / "report.json").exists()  # the trainer never started
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")
    assert app.return_value != 0


def write_finished_run(run_dir: Path, align: list[float]) -> None:
    run_dir.mkdir(parents=True)
    recs = [{"v": 1, "ts": 1000.0, "event": "run", "mode": "strided", "max_steps": len(align)}]
    for i, a in enumerate(align, 1):
        recs.append({"v": 1, "ts": 1000.0 + i, "event": "metrics", "step": i, "max_steps": len(align),
                     "ebft/alignment": a, "ebft/diversity": 0.05, "ebft/cfm_loss": 4.0 - 0.1 * i,
                     "ebft/reward": a - 0.1, "grad_norm": 1.0, "entropy": 0.2})
    recs.append({"v": 1, "ts": 2000.0, "event": "warning", "step": len(align), "metric": "ebft/alignment",
                 "message": "alignment stays below 0.1", "hint": "Try different feature_layers or embed_method"})
    recs.append({"v": 1, "ts": 2001.0, "event": "status", "phase": "done", "step": len(align)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run_dir / "trainer.log").write_text("step 1/4 | align +0.200 ^\nstep 2/4 | align +0.100 v\n")
    (run_dir / "state.json").write_text(json.dumps({"status": "finished", "processes": [
        {"name": "trainer", "pid": 999999, "state": "exited", "returncode": 0}]}))


async def test_watch_mode_is_read_only_and_shows_hints(tmp_path):
    run_dir = tmp_path / "old-run"
    write_finished_run(run_dir, [0.2, 0.12, 0.08, 0.05])
    app = EbftApp(watch_dir=run_dir, install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, RunScreen) and screen.readonly
        await wait_for(pilot, lambda: screen.history.step == 4, what="the history")
        await pilot.pause()
        align = screen.card("ebft/alignment")
        assert align.arrow == "↓" and align.query_one(".card-arrow").has_class("-against")
        assert align.has_class("-bad")  # 0.05 is below the spec's 0.1 alarm value
        hints = str(screen.query_one("#hints").content)
        assert "feature_layers" in hints and "alignment stays below 0.1" in hints
        assert "finished" in str(screen.query_one("#run-state").content)
        assert screen.query_one("#log-trainer").total_lines == 2
        # Read-only: stop and restart are not offered.
        assert screen.check_action("stop", ()) is False and screen.check_action("restart", ()) is False
        await pilot.press("s")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        # Help lists the screen's keys.
        await pilot.press("question_mark")
        await pilot.pause()
        assert "Follow log" in str(app.screen.query_one(".help-keys").content)
        await pilot.press("escape")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, what="the app to exit")


async def test_gpu_picker_checks_the_count_for_the_mode():
    gpus = [GpuInfo(0, "NVIDIA H100", 95.0, 70_000, 81_559), GpuInfo(1, "NVIDIA H100", 0.0, 500, 81_559),
            GpuInfo(2, "NVIDIA H100", 2.0, 600, 81_559)]
    results: list = []
    app = EbftApp(presets=[], install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(GpuPickerScreen("structured", 2, lambda: gpus), results.append)
        picker = app.screen
        await wait_for(pilot, lambda: picker.gpus is not None, what="the GPU list")
        assert picker.chosen == [1, 2]  # the busy GPU 0 is not pre-selected
        assert not picker.query_one("#launch").disabled
        picker.query_one("#gpu-list").deselect(2)
        await pilot.pause()
        assert picker.query_one("#launch").disabled
        assert "needs 2 GPUs" in str(picker.query_one("#gpu-check").content)
        picker.query_one("#gpu-list").select(0)
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
    assert results == [[0, 1]]


def test_override_items_round_trip_through_the_cli_parser():
    from ebft_tui.overrides import parse_override

    for key, value in [("learning_rate", 1e-5), ("x", 1e20), ("y", 0.5), ("n", 3), ("b", True),
                       ("s", "yes"), ("s2", "2026-01-01"), ("s3", "plain"), ("l", [0.25, 0.5]),
                       ("d", {"a": 1}), ("none", None)]:
        path, parsed = parse_override(override_item(key, value))
        assert parsed == value and type(parsed) is type(value), (key, value, parsed)


def test_parse_text_checks_type_and_minimum():
    assert parse_text("12", {"type": "int", "min": 1}) == (12, None)
    assert parse_text("0", {"type": "int", "min": 1})[1] == "must be ≥ 1"
    assert parse_text("1e-5", {"type": "float"}) == (1e-5, None)
    assert parse_text("abc", {"type": "float"})[1].startswith("must be a number")
    assert parse_text("[1, 2]", {"type": "list"}) == ([1, 2], None)
    assert parse_text("[q_proj, v_proj]", {"type": "list", "item_type": "str"}) == (["q_proj", "v_proj"], None)
    assert parse_text(r".*\.(q|v)_proj", {"type": "list"}) == (r".*\.(q|v)_proj", None)  # a pattern
    assert parse_text("[1, x]", {"type": "list", "item_type": "int"})[1] == "must be a list of int values"
    assert parse_text("{a: 1", {"type": "dict"})[1].startswith("must be a YAML mapping")
    assert parse_text("", {"type": "int"}) == (None, None)


def test_every_preset_value_survives_the_form_round_trip():
    """What the form shows for a preset's value reads back as exactly that value, for every field
    of the engine's schema in every preset: opening a preset and pressing Start changes nothing."""
    from ebft_tui.engine import schema_fields
    from ebft_tui.presets import list_presets
    from ebft_tui.tui.screens.config_form import display_text, flatten

    fields = schema_fields()
    checked = 0
    for preset in list_presets():
        flat = flatten(yaml.safe_load(preset.path.read_text()))
        for field in fields:
            if field["key"] not in flat or field["type"] in ("bool", "enum"):
                continue  # switches and drop-downs hold the value itself
            value = flat[field["key"]]
            parsed, error = parse_text(display_text(value, field["type"]), field)
            assert error is None and parsed == value, (preset.name, field["key"], value, parsed, error)
            checked += 1
    assert checked > 100


async def test_real_engine_form_and_a_cross_key_problem_on_its_field():
    """With the engine's own schema and validator: a preset opens valid with no override, fields of
    the other mode are hidden, and a cross-key problem shows under the key it names."""
    from ebft_tui.presets import list_presets

    presets = {p.name: p for p in list_presets()}
    app = EbftApp(presets=list(presets.values()), install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        for name in ("smollm2-135m-strided-cpu", "smollm2-135m-structured-cpu"):
            app.open_preset(presets[name])
            await wait_for(pilot, lambda: isinstance(app.screen, ConfigFormScreen) and app.screen.ready,
                           what=f"the form of {name}")
            form = app.screen
            assert form.overrides() == [] and form.n_problems == 0, (name, form.engine_problems)
            assert not form.query_one("#start").disabled
            strided = name == "smollm2-135m-strided-cpu"
            assert form.rows["trl.num_generations"].display is not strided
            assert form.rows["ebft.stride"].display is strided
            assert all(key in form.rows for key in ("adam_beta1", "adam_beta2", "adam_epsilon",
                                                    "chat_template_jinja"))
            if not strided:
                form.rows["trl.num_generations"].editor.value = "3"
                await pilot.pause()
                await wait_for(pilot, lambda: not form.pending, what="the engine's verdict")
                batch = form.rows["micro_batch_size"]
                assert batch.has_class("-invalid")
                assert "whole prompt groups" in str(batch.query_one(".field-error").content)
                assert form.query_one("#start").disabled
            app.pop_screen()
            await pilot.pause()
