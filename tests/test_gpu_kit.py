"""The GPU proof kit (scripts/gpu-check.sh, scripts/gpu_check.py): its pieces, and its rehearsal on
the CPU end to end (CI's proof that the kit itself works before a GPU is ever lent)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_kit():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kit = load_kit()


def test_part_limits_keep_time_for_the_parts_after():
    assert kit.part_limit(120, remaining=450, parts_after=7) == 120  # its own cap
    assert kit.part_limit(120, remaining=100, parts_after=2) == 100 - 2 * kit.MIN_PART_S
    assert kit.part_limit(120, remaining=20, parts_after=3) == 0  # nothing left: skipped


def test_a_part_past_its_limit_is_stopped_and_reported(tmp_path):
    part = kit.Part("sleeper", "sleeps", [sys.executable, "-c", "import time; time.sleep(600)"], 1,
                    lambda d: ({}, ""))
    done = kit.run_part(part, 0.5, io.StringIO(), {}, tmp_path)
    assert done.status == "timeout" and done.rc is not None
    skipped = kit.run_part(part, 0, io.StringIO(), {}, tmp_path)
    assert skipped.status == "skipped" and "no time left" in skipped.log


def test_stopping_a_part_takes_its_whole_tree(tmp_path):
    """A bench starts servers in their own sessions: killing the part's group would miss them."""
    import psutil

    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
            f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 60  # a hang guard
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        grandchild = int(pid_file.read_text())
        kit.stop_tree(proc.pid)
        assert proc.wait(30) is not None
        gone, alive = psutil.wait_procs([psutil.Process(grandchild)], timeout=30)
        assert not alive
    except psutil.NoSuchProcess:
        pass  # already reaped: gone
    finally:
        if proc.poll() is None:
            proc.kill()


def test_test_results_are_read_from_junit_xml(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.a" name="test_ok"/>'
        '<testcase classname="tests.a" name="test_gpu"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="tests.b" name="test_bad"><failure message="assert 1 == 2"/></testcase>'
        '</testsuite></testsuites>')
    done = kit.Done(kit.Part("tests", "t", [], 1, kit.summarize_tests), "ok", 0, 1.0, 1, "", tmp_path)
    figures, line = kit.summarize_tests(done)
    assert figures["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert line == "1 passed, 1 failed, 1 skipped"
    assert figures["cases"][2] == {"test": "tests.b::test_bad", "outcome": "failed", "message": "assert 1 == 2"}


def test_a_run_with_non_finite_metrics_is_a_failure(tmp_path):
    run = tmp_path / "strided-run"
    run.mkdir()
    rows = [{"event": "metrics", "step": 1, "loss": 1.0, "ebft/alignment": 0.1, "step_time_s": 2.0},
            {"event": "metrics", "step": 2, "loss": None, "ebft/alignment": 0.2, "step_time_s": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = kit.Done(kit.Part("strided_run", "r", [], 1, kit.summarize_run), "ok", 0, 1.0, 1, "", tmp_path)
    figures, _ = kit.summarize_run(done)
    assert figures["steps"] == 2 and figures["median_step_s_after_first"] == 1.0
    assert not figures["all_finite"] and "non-finite" in figures["problem"]


def test_report_shows_every_part_with_its_command(tmp_path):
    scratch = tmp_path / "scratch"
    argv = [kit.PY, str(kit.REPO / "bench" / "x.py"), "--json", str(scratch / "x.json")]
    ok = kit.Done(kit.Part("x", "bench x", argv, 10, lambda d: ({}, "")), "ok", 0, 2.0, 10, "fine", scratch,
                  figures={"table": "a  b\n-  -\n1  2"}, summary="x: 1 ms")
    bad = kit.Done(kit.Part("y", "bench y", [kit.PY, "-c", "boom"], 10, lambda d: ({}, "")), "failed", 1, 1.0,
                   10, "Traceback ... RuntimeError: boom", scratch, summary="boom")
    meta = {"rehearse": True, "started": "now", "command": "bash scripts/gpu-check.sh --rehearse",
            "budget_s": 900, "seconds": 3.0}
    kit.write_report(tmp_path, [ok, bad], meta)
    md = (tmp_path / "gpu-report.md").read_text()
    assert "| x | ok | 2 (10) | x: 1 ms |" in md and "| y | failed |" in md
    assert "`python3 bench/x.py --json $KIT_TMP/x.json`" in md  # re-runnable from the repo root
    assert "RuntimeError: boom" in md  # a failed part shows its output
    record = json.loads((tmp_path / "gpu-report.json").read_text())
    assert [p["status"] for p in record["parts"]] == ["ok", "failed"]
    assert record["parts"][0]["figures"]["table"].startswith("a  b")


def kit_env() -> dict[str, str]:
    """The kit runs the interpreter that runs the tests (not whatever `python3` is on PATH)."""
    return {**os.environ, "PYTHON": sys.executable}


def test_unknown_part_is_a_usage_error(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu-check.sh", "--rehearse", "--only", "nope", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=kit_env())
    assert done.returncode == 2 and "unknown part(s) nope" in done.stderr and "strided_step" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rehearsal_runs_every_part_and_writes_the_report(tmp_path):
    """`bash scripts/gpu-check.sh --rehearse` (the same parts as on a GPU, tiny sizes, ~1-2 min on
    2 cores): every part succeeds and the report holds its figures."""
    out = tmp_path / "out"
    done = subprocess.run(["bash", "scripts/gpu-check.sh", "--rehearse", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=870, env=kit_env())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-kit.log", "gpu-report.json", "gpu-report.md"]
    record = json.loads((out / "gpu-report.json").read_text())
    parts = {p["name"]: p for p in record["parts"]}
    assert list(parts) == ["env", "tests", "model", "strided_run", "structured", "strided_step",
                           "flex_vs_dense", "strided_generation"]
    assert {p["status"] for p in parts.values()} == {"ok"}
    env = parts["env"]["figures"]
    assert env["torch"] and all(not str(v).startswith("error") for v in env["imports"].values())
    tests = parts["tests"]["figures"]
    assert tests["counts"]["failed"] == 0 and len(tests["cases"]) >= 5  # CUDA-only: skipped on a CPU
    run = parts["strided_run"]["figures"]
    assert run["steps"] == 2 and run["all_finite"]
    structured = parts["structured"]["figures"]  # bench/structured_sync_async.py, two trainers
    sync, async_ = structured["sync"], structured["async"]
    assert sync["steps"] == async_["steps"] == 2
    # sync waits on all of its generation; async at most on all of it
    assert sync["wait_s"] == pytest.approx(sync["gen_s"], rel=0.05, abs=0.05)
    assert 0 <= async_["wait_s"] <= async_["loop_s"]
    step = parts["strided_step"]["figures"]["results"]
    assert {r["part"] for r in step} == {"step", "train"} and all(r["step_s"] > 0 for r in step)
    flex = parts["flex_vs_dense"]["figures"]["results"]
    assert flex[0]["dense_s"] > 0 and flex[0]["flex_s"] > 0
    gen = parts["strided_generation"]["figures"]["results"]
    assert gen[0]["same_tokens"] is True
    md = (out / "gpu-report.md").read_text()
    assert "rehearsal on the CPU" in md
    for name, part in parts.items():
        assert f"`{part['command']}`" in md, name
    assert "USDT:" not in (out / "gpu-kit.log").read_text()  # the profiler's noise is filtered


def test_a_failed_bench_keeps_its_figures_and_an_import_error_fails_env(tmp_path):
    """A bench exits 1 when one contender fails, after writing the others' figures: they stay in
    the report. A package that does not import makes the env part fail, naming it."""
    (tmp_path / "flex_vs_dense.json").write_text(json.dumps({"table": "t", "command": "c", "results": [
        {"S": 1024, "flex_s": 0.01, "dense_s": 0.02, "flex_mb": 10.0, "dense_mb": 20.0},
        {"S": 4096, "flex_s": 0.04, "dense_s": None, "flex_mb": 40.0, "dense_mb": 0.0}]}))
    part = kit.Part("flex_vs_dense", "f", [], 1, kit.summarize_flex)
    d = kit.Done(part, "failed", 1, 1.0, 1, "...\nS=4096: OutOfMemoryError: CUDA out of memory\n", tmp_path)
    kit.judge(d)
    assert d.status == "failed" and len(d.figures["results"]) == 2
    assert "S=1024: flex 10 ms / dense 20 ms" in d.summary and "OutOfMemoryError" in d.summary
    (tmp_path / "env.json").write_text(json.dumps({"torch": "2.11", "imports": {
        "pydantic": "error: ModuleNotFoundError: No module named 'pydantic'", "datasets": "5.2.0"}}))
    env = kit.Done(kit.Part("env", "e", [], 1, kit.summarize_env), "ok", 0, 1.0, 1, "", tmp_path)
    kit.judge(env)
    assert env.status == "failed" and "cannot import pydantic" in env.summary
