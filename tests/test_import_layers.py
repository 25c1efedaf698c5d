"""Import layering (docs/architecture.md): ebft_tui never imports torch/ebft_engine (nor Textual
outside the app), and ebft_engine never imports ebft_tui or Textual. Fresh interpreters, so what
other tests imported does not matter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def loaded_after(code: str, forbidden: list[str]) -> list[str]:
    probe = code + "\nimport sys\nprint(' '.join(m for m in %r if m in sys.modules))" % (forbidden,)
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_cli_headless_and_runs_stay_light():
    code = ("import ebft_tui.cli, ebft_tui.headless, ebft_tui.watch, ebft_tui.runs.supervisor, ebft_tui.runs.plan, "
            "ebft_tui.runs.events, ebft_tui.metrics.history, ebft_tui.system.gpus, ebft_tui.system.procs, "
            "ebft_tui.engine, ebft_tui.presets")
    assert loaded_after(code, ["torch", "ebft_engine", "textual", "transformers"]) == []


def test_cli_help_does_not_load_textual():
    code = ("from typer.testing import CliRunner\nfrom ebft_tui.cli import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output")
    assert loaded_after(code, ["torch", "ebft_engine", "textual"]) == []


def test_the_tui_package_does_not_load_torch_or_the_engine():
    if not (REPO / "ebft_tui" / "tui" / "app.py").exists():
        return
    assert loaded_after("import ebft_tui.tui.app", ["torch", "ebft_engine", "transformers"]) == []


def test_engine_does_not_import_the_tui():
    assert loaded_after("import ebft_engine.config, ebft_engine.cli", ["ebft_tui", "textual"]) == []
    code = ("import contextlib, io, ebft_engine.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    ebft_engine.cli.main(['validate', 'presets/smollm2-135m-strided-cpu.yaml', '--json'])")
    assert loaded_after(code, ["ebft_tui", "textual"]) == []


def test_no_source_file_imports_across_the_line():
    import re

    pattern_tui = re.compile(r"^\s*(import|from)\s+(torch|ebft_engine)\b", re.M)
    pattern_engine = re.compile(r"^\s*(import|from)\s+(textual|ebft_tui)\b", re.M)
    bad = [str(p) for p in (REPO / "ebft_tui").rglob("*.py") if pattern_tui.search(p.read_text())]
    bad += [str(p) for p in (REPO / "ebft_engine").rglob("*.py") if pattern_engine.search(p.read_text())]
    assert bad == []
