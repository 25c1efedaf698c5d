"""The real `ebft-tui` in a real terminal: tmux runs it, send-keys types, capture-pane reads.

`test_preset_picker_in_tmux` opens the app on the preset picker, filters and quits (seconds).
`test_real_cpu_run_stop_and_reattach` (slow) runs `ebft run smollm2-135m-strided-cpu` in TUI mode,
the real engine training on the CPU (a tiny random model with SmolLM2's tokenizer: the screen is
the point, and the 135M model took minutes a step on a busy machine): reads the metric cards off
the screen (numbers, not placeholders), quits leaving the run going, re-attaches from a second
terminal through the runs screen (`ebft tui --runs`), stops it there (the step finishes, a
checkpoint, exit 143) and checks nothing is left running. Each test uses its own tmux server
(`-L`), so a user's tmux sessions are never touched.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"[+-]?\d+\.\d+")

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (apt-get install tmux) — the terminal tests need it")


class Tmux:
    """One detached tmux session on a private server, sized like a roomy SSH terminal."""

    def __init__(self, name: str, command: str, width: int = 160, height: int = 50, cwd: Path = REPO):
        self.socket = f"ebft-test-{os.getpid()}-{name}"
        self.session = name
        path = os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "TEXTUAL_ANIMATIONS": "none",
               "PYTHONPATH": os.pathsep.join([str(REPO), *([path] if path else [])])}
        env.pop("TMUX", None)
        # The shell keeps the pane open after the app exits and prints its exit code.
        wrapped = f"{command}; echo EBFT_EXIT=$?; sleep 60"
        self.tmux("new-session", "-d", "-s", name, "-x", str(width), "-y", str(height), "-c", str(cwd),
                  "bash", "-c", wrapped, env=env)

    def tmux(self, *args: str, env: dict | None = None) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30,
                             env=env, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.session, "-l", text)

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the screen was:\n{screen}")

    def exit_code(self, screen: str) -> int | None:
        m = re.search(r"EBFT_EXIT=(\d+)", screen)
        return int(m.group(1)) if m else None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def ebft(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "ebft_tui", *args])


def card_values(screen: str, label: str) -> list[str]:
    """The numbers on the line under a card row's titles (the row that holds `label`)."""
    lines = screen.splitlines()
    for i, line in enumerate(lines):
        if label in line and i + 1 < len(lines):
            return NUMBER.findall(lines[i + 1])
    return []


@pytest.mark.timeout(120)
def test_preset_picker_in_tmux():
    term = Tmux("picker", ebft("tui"))
    try:
        term.wait_for(lambda s: "smollm2-135m-strided-cpu" in s and "qwen3-4b" in s, 60, "the preset list")
        term.type("strided cpu")
        screen = term.wait_for(lambda s: "qwen3-4b-ebft-structured " not in s, 20, "the filter to apply")
        assert "smollm2-135m-strided-cpu" in screen
        assert "stride: 8" in screen  # the YAML preview of the highlighted preset
        term.keys("C-q")
        screen = term.wait_for(lambda s: "EBFT_EXIT=" in s, 20, "the app to quit")
        assert term.exit_code(screen) == 0
    finally:
        term.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_cpu_run_stop_and_reattach(tmp_path, tiny_smollm2_dir):
    from ebft_tui.runs.lock import live_holder
    from ebft_tui.runs.tail import read_jsonl

    run_dir = tmp_path / "outputs" / "cpu-run"
    # Steps enough not to finish on their own; no periodic checkpoint, so the stop's is the only one.
    term = Tmux("cpu-run", ebft("run", "smollm2-135m-strided-cpu", "max_steps=100000", "logging_steps=1",
                                "save_steps=1000000", f"base_model={tiny_smollm2_dir}", "bf16=false",
                                "--run-dir", str(run_dir)), cwd=tmp_path)
    watcher = None
    try:
        # hang guards only: each returns as soon as the screen shows what it waits for
        term.wait_for(lambda s: "alignment (want" in s, 300, "the run screen")
        screen = term.wait_for(lambda s: len(card_values(s, "alignment (want")) >= 2
                               and len(card_values(s, "reward (want")) >= 2, 600, "filled metric cards")
        assert "step " in screen and "ETA" in screen
        # 1. Quit, leaving the run going.
        term.keys("C-q")
        term.wait_for(lambda s: "Leave it running" in s, 30, "the quit question")
        term.keys("l")
        screen = term.wait_for(lambda s: "EBFT_EXIT=" in s, 60, "the app to quit")
        assert term.exit_code(screen) == 0 and "ebft watch" in screen, screen
        keeper = live_holder(run_dir)
        assert keeper is not None, "the run did not go on without the app"
        state = json.loads((run_dir / "state.json").read_text())
        trainer = state["processes"][0]["pid"]
        assert state["status"] == "running" and trainer
        # 2. Re-attach from another terminal through the runs screen, and stop it there.
        watcher = Tmux("reattach", ebft("tui", "--runs"), cwd=tmp_path)
        watcher.wait_for(lambda s: "cpu-run" in s and "running" in s, 60, "the live run in the runs screen")
        watcher.keys("Enter")
        watcher.wait_for(lambda s: "attached" in s and "alignment (want" in s, 60, "the re-attached run")
        watcher.keys("s")
        watcher.wait_for(lambda s: "Stop this run?" in s, 30, "the stop question")
        watcher.keys("y")
        # the countdown shows while the step finishes (a tiny model's step may be over first)
        watcher.wait_for(lambda s: "stopping: finishing step" in s or "attached · stopped" in s, 60, "the stop")
        watcher.wait_for(lambda s: "attached · stopped" in s, 600, "the graceful stop")
        watcher.keys("C-q")
        screen = watcher.wait_for(lambda s: "EBFT_EXIT=" in s, 60, "the second app to quit")
        assert watcher.exit_code(screen) == 0
        # 3. The trainer finished its step, checkpointed and exited 143; nothing is left.
        state = json.loads((run_dir / "state.json").read_text())
        assert state["status"] == "stopped" and state["processes"][0]["returncode"] == 143, state
        records = read_jsonl(run_dir / "metrics.jsonl")
        ckpts = [r for r in records if r.get("event") == "checkpoint"]
        assert len(ckpts) == 1 and (run_dir / ckpts[0]["path"]).is_dir()
        assert [r for r in records if r.get("event") == "status"][-1]["phase"] == "stopped"
        assert live_holder(run_dir) is None
        for pid in (keeper.pid, trainer):
            deadline = time.monotonic() + 60  # a hang guard
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _alive(pid), pid
    finally:
        term.close()
        if watcher is not None:
            watcher.close()
        holder = __import__("ebft_tui.runs.lock", fromlist=["read_lock"]).read_lock(run_dir)
        if holder is not None:  # a failed test must not leave a training run behind
            try:
                os.kill(holder.pid, 9)
            except OSError:
                pass


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
