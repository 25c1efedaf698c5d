"""`ebft run --headless` behaviour with a hand-built plan around the fakes, stdout piped."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakes.helpers import wait_dead, wait_for_file  # noqa: E402

from ebft_tui.headless import event_lines, record_lines  # noqa: E402
from ebft_tui.metrics.history import MetricHistory  # noqa: E402
from ebft_tui.runs.supervisor import SupervisorEvent  # noqa: E402

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(
    r"^step \d+/\d+ \| align [+-]\d\.\d{3} [\^v=] \| divers [+-]\d\.\d{3} [\^v=] \| cfm (\d+\.\d{3}|nan) [\^v=] \| "
    r"reward [+-]\d\.\d{3} [\^v=] \| gn \d+\.\d{2} \| \d+\.\ds$"
)
SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from fakes.helpers import fake_plan
    from ebft_tui.headless import run_headless
    a = json.loads(sys.argv[1])
    plan = fake_plan(Path(a["run_dir"]), tuple(a["trainer"]), None if a.get("server") is None else tuple(a["server"]))
    sys.exit(run_headless(plan, stop_grace_s=a.get("grace", 10.0)))
""")


def launch(tmp_path: Path, trainer: list[str], server: list[str] | None = None, grace: float = 10.0) -> subprocess.Popen:
    script = tmp_path / "headless_launcher.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests")))
    args = {"run_dir": str(tmp_path / "run"), "trainer": trainer, "server": server, "grace": grace}
    return subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)


def read_until(proc: subprocess.Popen, needle: str, timeout_s: float = 90) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not printed; got {lines}")


def test_one_plain_line_per_step_and_exit_code_zero(tmp_path):
    proc = launch(tmp_path, ["--steps", "6", "--torn", "--nan-at", "3", "--warning-at", "2", "--interval", "0.03"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    lines = out.splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert len(steps) == 6, out
    for ln in steps:
        assert LINE.match(ln), ln
    assert steps[1].startswith("step 2/6 | align +0.300 ^ | divers +0.048 v | cfm 4.800 v")
    assert "| cfm nan = |" in steps[2]
    assert any(ln.startswith("warning (step 2): ebft/alignment") for ln in lines)
    assert "\x1b[" not in out  # no terminal codes when piped
    assert any("run finished (exit code 0)" in ln for ln in lines)
    assert any(ln.startswith("[ebft] run dir: ") for ln in lines)
    assert any(ln.startswith("[ebft] last: step 6/6") for ln in lines)
    # process news comes after the lines the process logged
    assert lines.index(steps[-1]) < next(i for i, ln in enumerate(lines) if "trainer exited" in ln)


def test_exit_code_is_the_trainers(tmp_path):
    proc = launch(tmp_path, ["--steps", "5", "--crash-after", "2", "--exit-code", "3"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    assert len([ln for ln in out.splitlines() if ln.startswith("step ")]) == 2
    assert "error (step 2): fake crash" in out
    assert "trainer failed: exited with code 3" in out and "fake trainer crashing" in out


def test_server_failure_is_reported_with_its_log(tmp_path):
    proc = launch(tmp_path, ["--steps", "2"], server=["--exit-early", "5"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "server failed: exited with code 5" in out and "CUDA out of memory" in out
    assert "cannot start the run" in out


def test_ctrl_c_once_stops_gracefully(tmp_path):
    proc = launch(tmp_path, ["--steps", "2", "--hang", "--grandchild", "--report", str(tmp_path / "t.json")])
    try:
        read_until(proc, "step 2/2")
        info = wait_for_file(tmp_path / "t.json")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "stopping after this step" in out and "Ctrl+C again to kill now" in out and "run stopped" in out
    assert wait_dead([info["pid"], info["grandchild"]]) == []
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["status"] == "stopped" and state["processes"][0]["stopped_by_user"]


def test_ctrl_c_twice_kills(tmp_path):
    """The second Ctrl+C kills at once: the grace (600 s) is far beyond the test's own timeout, so
    only the kill path can end the launcher in time."""
    proc = launch(tmp_path, ["--steps", "1", "--hang", "--ignore-sigterm", "--report", str(tmp_path / "t.json")],
                  grace=600)
    try:
        read_until(proc, "step 1/1")
        info = wait_for_file(tmp_path / "t.json")
        proc.send_signal(signal.SIGINT)
        read_until(proc, "Ctrl+C again to kill")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "killing" in out
    assert wait_dead([info["pid"]]) == []


def test_sigterm_to_the_launcher_stops_the_children(tmp_path):
    proc = launch(tmp_path, ["--steps", "1", "--hang", "--report", str(tmp_path / "t.json")], server=[])
    try:
        read_until(proc, "step 1/1")
        info = wait_for_file(tmp_path / "t.json")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "server stopped" in out and "trainer stopped" in out
    assert wait_dead([info["pid"]]) == []


def test_line_helpers():
    h = MetricHistory()
    assert record_lines(h, {"event": "status", "phase": "loading", "step": 0, "message": "model"}) == \
        ["[loading] (step 0): model"]
    assert record_lines(h, {"event": "checkpoint", "step": 5, "path": "checkpoints/step-5"}) == \
        ["checkpoint (step 5): checkpoints/step-5"]
    assert record_lines(h, {"event": "eval", "step": 5, "eval/ce_loss": 0.25}) == ["eval (step 5): eval/ce_loss 0.25"]
    assert record_lines(h, {"event": "error", "message": "OOM", "hint": "lower sequence_len"}) == \
        ["error: OOM -> lower sequence_len"]
    assert record_lines(h, {"event": "run", "mode": "strided"}) == []
    ev = SupervisorEvent("failed", "server", 12, 1, "exited with code 1", ["a", "b"])
    assert event_lines(ev) == ["[ebft] server failed: exited with code 1", "[ebft] last lines of server.log:",
                               "    a", "    b"]


def test_ctrl_c_lets_a_slow_step_finish_and_checkpoint(tmp_path):
    """One Ctrl+C during a 3 s step: the trainer finishes it and checkpoints (exit 143, not a kill
    after the 0.5 s grace, which now bounds only other processes)."""
    proc = launch(tmp_path, ["--steps", "4", "--interval", "3", "--graceful", "--phases"], grace=0.5)
    try:
        read_until(proc, "[training] (step 0)")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "checkpoint (step 1): checkpoints/step-000001" in out
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["processes"][0]["returncode"] == 128 + signal.SIGTERM and state["status"] == "stopped"


def test_live_panel_uses_rich_progress_with_phase():
    from rich.console import Console

    from ebft_tui.headless import make_progress, render_panel, update_progress
    from ebft_tui.runs.plan import LaunchPlan

    h = MetricHistory()
    now = time.time()
    h.update_many([{"event": "run", "max_steps": 10, "ts": now - 20},
                   {"event": "metrics", "step": 2, "max_steps": 10, "ts": now - 10, "ebft/alignment": 0.4},
                   {"event": "metrics", "step": 3, "max_steps": 10, "ts": now - 5, "ebft/alignment": 0.5},
                   {"event": "phase", "phase": "generating", "step": 4, "ts": now - 2}])
    progress = make_progress()
    task = progress.add_task("steps", total=None, phase="")
    update_progress(progress, task, h)
    console = Console(width=120, record=True, color_system=None)
    console.print(render_panel(LaunchPlan(Path("/tmp/x"), "strided", [], None, []), h, [], {}, [], None, "", progress))
    text = console.export_text()
    assert "3/10" in text and "generating" in text and "ETA" in text
