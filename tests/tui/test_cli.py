"""The `ebft` CLI through typer's CliRunner (the engine runs as a real subprocess)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ebft_tui.cli import app
from ebft_tui.presets import list_presets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakes.helpers import FAKE_TRAINER  # noqa: E402

runner = CliRunner()
DEMO = "smollm2-135m-strided-cpu"


def demo_preset() -> str:
    names = [p.name for p in list_presets()]
    if DEMO not in names:
        pytest.skip(f"presets/{DEMO}.yaml is not written yet")
    return DEMO


def test_no_args_shows_help():
    res = runner.invoke(app, [])
    assert "ls" in res.output and "run" in res.output and "watch" in res.output


def test_ls_lists_every_preset():
    res = runner.invoke(app, ["ls"])
    assert res.exit_code == 0, res.output
    assert "PRESET" in res.output and "MODE" in res.output and "DEVICE" in res.output
    for p in list_presets():
        assert p.name in res.output


def test_cat_prints_the_file_and_unknown_names_fail_with_suggestions():
    name = demo_preset()
    res = runner.invoke(app, ["cat", name])
    assert res.exit_code == 0
    assert res.stdout == (Path(__file__).resolve().parents[2] / "presets" / f"{name}.yaml").read_text()
    res = runner.invoke(app, ["cat", name[:-1] + "x"])
    assert res.exit_code == 2
    assert "error:" in res.stderr and name in res.stderr and "Traceback" not in res.output


def test_cat_resolved_applies_overrides():
    res = runner.invoke(app, ["cat", demo_preset(), "--resolved", "max_steps=3"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.stdout)
    assert cfg["max_steps"] == 3 and cfg["ebft"]["mode"] == "strided"


def test_cp_copies_and_refuses_to_overwrite_without_force(tmp_path):
    name = demo_preset()
    dest = tmp_path / "sub" / "mine.yaml"
    res = runner.invoke(app, ["cp", name, str(dest)])
    assert res.exit_code == 0, res.output
    original = dest.read_text()
    dest.write_text("# edited\n")
    res = runner.invoke(app, ["cp", name, str(dest)])
    assert res.exit_code == 2 and dest.read_text() == "# edited\n"
    assert "exists" in res.stderr and "--force" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["cp", name, str(dest), "--force"])
    assert res.exit_code == 0 and dest.read_text() == original


def test_ls_at_80_columns_keeps_preset_names_whole(monkeypatch):
    from rich.console import Console

    import ebft_tui.cli as cli

    console = Console(width=80, force_terminal=True, highlight=False, record=True, color_system=None)
    monkeypatch.setattr(cli, "out", console)
    res = runner.invoke(app, ["ls"])
    assert res.exit_code == 0
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for p in list_presets():
        assert any(line.startswith(p.name + " ") for line in text.splitlines()), p.name


def test_validate_ok_prints_the_resolved_config():
    res = runner.invoke(app, ["validate", demo_preset(), "max_steps=4"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.stdout)["max_steps"] == 4
    assert "config is valid" in res.stderr


def test_validate_broken_config_exits_2_naming_the_key(tmp_path):
    src = yaml.safe_load((Path(__file__).resolve().parents[2] / "presets" / f"{demo_preset()}.yaml").read_text())
    src["ebft"]["stride"] = 0
    src["max_stepz"] = 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(src))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "ebft.stride" in res.stderr and "max_stepz" in res.stderr and "max_steps" in res.stderr
    assert "2 problems" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["validate", demo_preset(), "ebft.stride=-1"])
    assert res.exit_code == 2 and "ebft.stride" in res.stderr


def test_bad_override_and_missing_file_exit_2():
    res = runner.invoke(app, ["validate", demo_preset(), "max_steps"])
    assert res.exit_code == 2 and "max_steps" in res.stderr and "key=value" in res.stderr
    res = runner.invoke(app, ["validate", "no/such/config.yaml"])
    assert res.exit_code == 2 and "no/such/config.yaml" in res.stderr
    res = runner.invoke(app, ["run", demo_preset(), "--gpus", "zero", "--headless"])
    assert res.exit_code == 2 and "--gpus" in res.stderr


def test_run_reports_config_problems_before_starting(tmp_path):
    res = runner.invoke(app, ["run", demo_preset(), "--headless", "learning_rate=-1", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "learning_rate" in res.stderr
    assert not (tmp_path / "r" / "state.json").exists()


def test_run_and_train_refuse_a_run_dir_held_by_a_live_launcher(tmp_path, monkeypatch):
    from ebft_tui.runs import lock

    import subprocess

    run_dir = tmp_path / "held"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # another launcher
    lock.acquire(run_dir, pid=other.pid, command="ebft run --headless other")
    try:
        res = runner.invoke(app, ["run", demo_preset(), "--headless", "--run-dir", str(run_dir)])
        assert res.exit_code == 2, res.output
        assert f"pid {other.pid}" in res.stderr and "ebft watch" in res.stderr and "Traceback" not in res.output
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "command.txt").exists()  # nothing written
        monkeypatch.setenv("EBFT_RUN_DIR", str(run_dir))
        res = runner.invoke(app, ["train", demo_preset()])
        assert res.exit_code == 2 and "in use by a running launcher" in res.stderr
        assert not (run_dir / "metrics.jsonl").exists()  # no second trainer
    finally:
        lock.release(run_dir, pid=other.pid)
        other.kill()
        other.wait()


def test_gpus_says_when_there_is_none():
    res = runner.invoke(app, ["gpus", "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    if data["gpus"]:
        pytest.skip("this machine has GPUs")
    assert data["reason"]
    res = runner.invoke(app, ["gpus"])
    assert "no GPU found (NVML unavailable): runs will use the CPU" in res.output


def test_watch_once_prints_the_history(tmp_path):
    import subprocess

    subprocess.run([sys.executable, str(FAKE_TRAINER), "--out", str(tmp_path), "--steps", "4", "--interval", "0",
                    "--warning-at", "2"], check=True, capture_output=True)
    res = runner.invoke(app, ["watch", str(tmp_path), "--once"])
    assert res.exit_code == 0, res.output
    steps = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert len(steps) == 4 and steps[-1].startswith("step 4/4 | align +0.400 ^")
    assert "warning (step 2)" in res.stdout and "alignment" in res.stdout and "finished" in res.stdout
    # No state.json but the log says done: following ends by itself.
    res = runner.invoke(app, ["watch", str(tmp_path)])
    assert res.exit_code == 0 and len([ln for ln in res.stdout.splitlines() if ln.startswith("step ")]) == 4
    res = runner.invoke(app, ["watch", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a directory" in res.stderr


def test_train_forwards_the_engine_exit_code(tmp_path):
    res = runner.invoke(app, ["train", "no-such-preset-anywhere"])
    assert res.exit_code == 2 and "ebft ls" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: x\nmax_stepz: 3\n")
    res = runner.invoke(app, ["train", str(bad)])  # the engine itself refuses it with exit code 2
    assert res.exit_code == 2
    res = runner.invoke(app, ["train", str(bad), "--no-such-engine-flag"])  # argparse: exit 2 too
    assert res.exit_code == 2


def test_serve_refuses_backend_args():
    res = runner.invoke(app, ["serve", demo_preset(), "--", "--max-num-seqs", "8"])
    assert res.exit_code == 2 and "vllm" in res.stderr


def test_engine_bridge_validate_dict_and_schema():
    from ebft_tui.engine import _schema_json, engine_argv, schema_fields, validate_dict

    assert engine_argv("schema")[1:] == ["-m", "ebft_engine", "schema"]
    fields = schema_fields()
    keys = {f["key"] for f in fields}
    assert {"base_model", "max_steps", "ebft.stride"} <= keys
    misses = _schema_json.cache_info().misses
    assert schema_fields() == fields and _schema_json.cache_info().misses == misses  # cached: no second subprocess
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "presets" / f"{demo_preset()}.yaml").read_text())
    ok = validate_dict(cfg)
    assert ok.ok and ok.config["ebft"]["mode"] == "strided" and ok.problems == []
    cfg["ebft"]["stride"] = 0
    bad = validate_dict(cfg)
    assert not bad.ok and bad.config is None and [k for k, _ in bad.problems] == ["ebft.stride"]
