"""The real `ebft-tui` in a real terminal: tmux runs it, send-keys types, capture-pane reads.

`test_preset_picker_in_tmux` opens the app on the preset picker, filters and quits (seconds).
`test_real_cpu_run_fills_the_cards` (slow) runs `ebft run smollm2-135m-strided-cpu max_steps=3`
in TUI mode, the real engine training on the CPU (a tiny random model with SmolLM2's tokenizer: the
screen is the point, and the 135M model took minutes on a busy machine), and reads the metric cards
off the screen: numbers, not placeholders. Each test uses its own tmux server (`-L`), so a user's tmux
sessions are never touched.
"""

from __future__ import annotations

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
        env = {**os.environ, "TEXTUAL_ANIMATIONS": "none"}
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
def test_real_cpu_run_fills_the_cards(tmp_path, tiny_smollm2_dir):
    run_dir = tmp_path / "run"
    term = Tmux("cpu-run", ebft("run", "smollm2-135m-strided-cpu", "max_steps=3", "logging_steps=1",
                                f"base_model={tiny_smollm2_dir}", "bf16=false", "--run-dir", str(run_dir)))
    try:
        # hang guards only: each returns as soon as the screen shows what it waits for
        screen = term.wait_for(lambda s: "alignment (want" in s, 300, "the run screen")
        screen = term.wait_for(lambda s: "step 3/3" in s or "EBFT_EXIT=" in s or "failed" in s, 400,
                               "three training steps")
        assert "step 3/3" in screen, screen
        # Cards are filled: numbers under alignment/diversity/CFM and under reward/grad norm.
        screen = term.wait_for(lambda s: len(card_values(s, "alignment (want")) >= 3
                               and len(card_values(s, "reward (want")) >= 2, 30, "filled metric cards")
        assert "—" not in screen.splitlines()[[i for i, l in enumerate(screen.splitlines())
                                               if "alignment (want" in l][0] + 1]
        screen = term.wait_for(lambda s: "finished" in s or "EBFT_EXIT=" in s, 120, "the run to finish")
        assert "finished" in screen, screen
        term.keys("C-q")
        screen = term.wait_for(lambda s: "EBFT_EXIT=" in s, 60, "the app to quit")
        assert term.exit_code(screen) == 0, screen
        assert (run_dir / "metrics.jsonl").stat().st_size > 0
    finally:
        term.close()
