"""The pass@1 sandbox: generated code runs confined; runaway or hostile programs fail, never harm."""

from __future__ import annotations

from pathlib import Path

from ebft_engine.sandbox import humaneval_program, run_program


def test_correct_program_passes_and_wrong_one_fails():
    ok = run_program("assert sum(range(4)) == 6\nprint('fine')\n")
    assert ok.passed and ok.status == "passed" and "fine" in ok.stdout
    bad = run_program("assert 1 + 1 == 3\n")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr


def test_infinite_loop_is_stopped_and_counted_failed():
    res = run_program("while True:\n    pass\n", timeout_s=2)
    assert not res.passed
    assert res.status in ("timeout", "failed")  # killed by the wall clock or by RLIMIT_CPU


def test_sleeping_forever_is_stopped_by_wall_clock():
    res = run_program("import time\ntime.sleep(1000)\n", timeout_s=1.5)
    assert res.status == "timeout" and not res.passed


def test_write_outside_temp_dir_is_refused(tmp_path: Path):
    target = tmp_path / "escaped.txt"
    res = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert not res.passed and "sandbox" in res.stderr
    assert not target.exists()


def test_delete_outside_temp_dir_is_refused(tmp_path: Path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    res = run_program(f"import os\nos.remove({str(victim)!r})\n")
    assert not res.passed
    assert victim.read_text() == "precious"


def test_writing_inside_its_own_dir_is_allowed():
    res = run_program("import os\nopen('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n")
    assert res.passed, res.stderr


def test_network_and_processes_are_refused():
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert not net.passed and "sandbox" in net.stderr
    proc = run_program("import subprocess\nsubprocess.run(['true'])\n")
    assert not proc.passed and "sandbox" in proc.stderr
    system = run_program("import os\nos.system('true')\n")
    assert not system.passed


def test_memory_bomb_fails():
    res = run_program("x = bytearray(4 * 1024 ** 3)\n", memory_mb=256)
    assert not res.passed and "MemoryError" in res.stderr


def test_humaneval_program_runs_the_tasks_check():
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    good = run_program(humaneval_program(prompt, "    return a + b\n", test, "add"))
    wrong = run_program(humaneval_program(prompt, "    return a - b\n", test, "add"))
    assert good.passed and not wrong.passed

