"""Acceptance: the demo preset really trains under `ebft run --headless`, and `ebft watch --once`
reads the run back (issue 6). Real engine, real SmolLM2 on CPU: slow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRESET = "smollm2-135m-strided-cpu"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_headless_demo_run_then_watch_once(tmp_path):
    if not (REPO / "presets" / f"{PRESET}.yaml").exists():
        pytest.skip("the demo preset is not written yet")
    run_dir = tmp_path / "run"
    out_file = tmp_path / "out.txt"
    env = dict(os.environ, COLUMNS="200")
    with open(out_file, "w") as out:  # stdout is a file, not a terminal: plain lines
        rc = subprocess.run(
            [sys.executable, "-m", "ebft_tui", "run", "--headless", PRESET, "max_steps=3", f"output_dir={run_dir}"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, timeout=1700,
        ).returncode
    text = out_file.read_text()
    assert rc == 0, text
    steps = [ln for ln in text.splitlines() if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in steps] == ["step 1/3", "step 2/3", "step 3/3"], text
    # Same lines as the engine's own console output (trainer.log).
    engine_lines = [ln for ln in (run_dir / "trainer.log").read_text().splitlines() if ln.startswith("step ")]
    assert steps == engine_lines
    assert "run finished (exit code 0)" in text and "\x1b[" not in text
    for name in ("config.yaml", "command.txt", "env.json", "state.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name

    watch = subprocess.run([sys.executable, "-m", "ebft_tui", "watch", str(run_dir), "--once"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert watch.returncode == 0, watch.stderr
    assert [ln for ln in watch.stdout.splitlines() if ln.startswith("step ")] == steps
    assert f"run {run_dir}: finished, step 3/3" in watch.stdout
