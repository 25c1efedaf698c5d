"""Stop, kill and resume: the resumed run ends where an uninterrupted one does, and metrics.jsonl
holds exactly one metrics record per step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ebft_engine import watchdog
from ebft_engine.metrics import read_records
from test_train_loop import metric_records, run_tiny, tiny_cfg, trainable

REPO = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing in the loop catches it, no record is written."""


def killed_in_step(n, cfg, **kwargs):
    """A run killed in the middle of step `n`: steps before it are logged, no more records."""
    def kill(step, loss):
        if step == n:
            raise Killed
        return loss

    with pytest.raises(Killed):
        run_tiny(cfg, hooks={"loss": kill}, **kwargs)


def uninterrupted(tmp_path, **overrides):
    built = {}
    assert run_tiny(tiny_cfg(tmp_path / "straight", **overrides), built=built) == 0
    return trainable(built["model"]), metric_records(tmp_path / "straight")


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_stop_at_step_4_then_resume_matches_an_uninterrupted_run(tmp_path):
    expected_params, expected_metrics = uninterrupted(tmp_path)
    run = tmp_path / "run"

    def stop_after_4(step):
        if step == 4:
            watchdog.STOP.request(signal.SIGTERM)

    assert run_tiny(tiny_cfg(run, save_steps=100), hooks={"after": stop_after_4}) == 128 + signal.SIGTERM
    events = read_records(run / "metrics.jsonl")
    assert events[-1]["event"] == "status" and events[-1]["phase"] == "stopped" and events[-1]["step"] == 4
    assert [e["path"] for e in events if e["event"] == "checkpoint"] == ["checkpoints/step-000004"]
    assert not (run / "adapter").exists()

    built = {}  # a fresh model, optimizer and stepper: what a new process builds
    assert run_tiny(tiny_cfg(run, save_steps=100), built=built) == 0
    assert_same_params(trainable(built["model"]), expected_params)
    records = metric_records(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for got, want in zip(records, expected_metrics):
        assert got["loss"] == want["loss"] and got["lr"] == want["lr"] and got["epoch"] == want["epoch"]
    runs = [e for e in read_records(run / "metrics.jsonl") if e["event"] == "run"]
    assert [r["resumed_from"] for r in runs] == [None, "checkpoints/step-000004"]


class Lookahead:
    """Takes each step's rows one step early, as structured async mode does (the first step takes
    two steps' rows, the last none), and says how many it holds untrained (`rows_in_flight`)."""

    def __init__(self, inner, cfg):
        self.inner, self.r, self.max_steps = inner, inner.rows_per_step, int(cfg.max_steps)
        self.queue: list[list] = []
        self.next_step = None  # the first step whose rows have not been taken

    @property
    def rows_per_step(self) -> int:
        if self.next_step is None:
            return 2 * self.r
        return 0 if self.next_step > self.max_steps else self.r

    @property
    def rows_in_flight(self) -> int:
        return sum(len(batch) for batch in self.queue)

    def run_step(self, rows, step):
        self.next_step = step if self.next_step is None else self.next_step
        rows = list(rows)
        for i in range(0, len(rows), self.r):
            self.queue.append(rows[i:i + self.r])
            self.next_step += 1
        return self.inner.run_step(self.queue.pop(0), step)

    def after_optimizer_step(self, step):
        self.inner.after_optimizer_step(step)

    def close(self):
        self.inner.close()


def test_a_stepper_that_takes_rows_ahead_resumes_without_skipping_them(tmp_path):
    """The checkpoint gives the rows taken for the next step back to the data order."""
    built = {}
    assert run_tiny(tiny_cfg(tmp_path / "straight"), built=built, wrap=Lookahead) == 0
    expected = trainable(built["model"])
    run = tmp_path / "run"

    def stop_after_4(step):
        if step == 4:
            watchdog.STOP.request(signal.SIGTERM)

    assert run_tiny(tiny_cfg(run, save_steps=100), hooks={"after": stop_after_4},
                    wrap=Lookahead) == 128 + signal.SIGTERM
    built = {}
    assert run_tiny(tiny_cfg(run, save_steps=100), built=built, wrap=Lookahead) == 0
    assert [r["step"] for r in metric_records(run)] == list(range(1, 9))
    assert_same_params(trainable(built["model"]), expected)


def test_hard_kill_after_the_checkpoint_reruns_steps_without_duplicating_their_records(tmp_path):
    expected_params, expected_metrics = uninterrupted(tmp_path, save_steps=2)
    run = tmp_path / "run"

    killed_in_step(6, tiny_cfg(run, save_steps=2))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"v": 1, "ts": 1.0, "event": "metrics", "st')  # the kill tore a line
    assert [r["step"] for r in metric_records(run)] == [1, 2, 3, 4, 5]

    built = {}
    assert run_tiny(tiny_cfg(run, save_steps=2), built=built) == 0  # resumes from step 4
    assert_same_params(trainable(built["model"]), expected_params)
    records = metric_records(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [r["loss"] for r in expected_metrics]
    resumed = [e for e in read_records(run / "metrics.jsonl") if e["event"] == "status" and e["phase"] == "resumed"]
    assert len(resumed) == 1 and "steps 5-5 are re-run" in resumed[0]["message"]


def test_kill_before_the_first_checkpoint_restarts_from_step_0_without_duplicates(tmp_path):
    expected_params, _ = uninterrupted(tmp_path, save_steps=8)
    run = tmp_path / "run"

    killed_in_step(3, tiny_cfg(run, save_steps=8))
    built = {}
    assert run_tiny(tiny_cfg(run, save_steps=8), built=built) == 0
    assert_same_params(trainable(built["model"]), expected_params)
    assert [r["step"] for r in metric_records(run)] == list(range(1, 9))


def test_rerunning_a_finished_run_changes_nothing(tmp_path):
    run = tmp_path / "run"
    built = {}
    assert run_tiny(tiny_cfg(run), built=built) == 0
    done = trainable(built["model"])
    assert run_tiny(tiny_cfg(run), built=built) == 0
    assert_same_params(trainable(built["model"]), done)
    assert [r["step"] for r in metric_records(run)] == list(range(1, 9))


def test_a_finished_run_can_be_extended_with_more_steps(tmp_path):
    run = tmp_path / "run"
    assert run_tiny(tiny_cfg(run, max_steps=4, save_steps=2)) == 0
    assert run_tiny(tiny_cfg(run, max_steps=6, save_steps=2)) == 0
    assert [r["step"] for r in metric_records(run)] == list(range(1, 7))


def test_a_different_config_refuses_to_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_tiny(tiny_cfg(run, max_steps=2, save_steps=2)) == 0
    assert run_tiny(tiny_cfg(run, max_steps=2, save_steps=2, learning_rate=1.0)) == 2
    err = capsys.readouterr().err
    assert "different config (learning_rate)" in err
    errors = [e for e in read_records(run / "metrics.jsonl") if e["event"] == "error"]
    assert "learning_rate" in errors[-1]["message"]


def test_no_resume_refuses_an_existing_run_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_tiny(tiny_cfg(run, max_steps=2, save_steps=2)) == 0
    assert run_tiny(tiny_cfg(run, max_steps=2, save_steps=2), resume=False) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_tiny(tiny_cfg(run, max_steps=3, save_steps=3, learning_rate=1e-3), resume=False, overwrite=True) == 0
    assert [r["step"] for r in metric_records(run)] == [1, 2, 3]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000003"]
    runs = [e for e in read_records(run / "metrics.jsonl") if e["event"] == "run"]
    assert len(runs) == 1 and runs[0]["resumed_from"] is None


# ---------------------------------------------------------------------------------------------
# Processes: the launcher watchdog, and SIGKILL + restart of the real command


WATCHED_CHILD = textwrap.dedent("""
    import os, sys, time
    from ebft_engine import watchdog
    watchdog.install_stop_handlers()
    watchdog.STOP.graceful = True
    watchdog.start_parent_watchdog(poll_s=0.1, grace_s=30)
    print(os.getpid(), flush=True)
    while not watchdog.stop_requested():
        time.sleep(0.05)
    open(sys.argv[1], "w").write("stopped gracefully")
    sys.exit(watchdog.STOP.exit_code())
""")

LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    env = dict(os.environ, EBFT_PARENT_PID=str(os.getpid()))
    argv = [sys.executable, "-c", sys.argv[1], sys.argv[2]]
    if sys.argv[3] == "wrapped":  # a shell between launcher and engine (`; true` keeps sh alive)
        argv = ["sh", "-c", '"$0" "$@"; true', *argv]
    child = subprocess.Popen(argv, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    print(child.stdout.readline().decode().strip(), flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("how", ["direct", "wrapped"])
def test_the_engine_stops_gracefully_when_its_launcher_is_killed(tmp_path, how):
    marker = tmp_path / "marker"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WATCHED_CHILD, str(marker), how],
                                stdout=subprocess.PIPE, cwd=REPO)
    try:
        child_pid = int(launcher.stdout.readline())
        launcher.kill()  # SIGKILL: the launcher runs no cleanup at all
        launcher.wait()
        deadline = time.time() + 60  # a hang guard: the watchdog polls every 0.1 s
        while time.time() < deadline and _alive(child_pid):
            time.sleep(0.1)
        assert not _alive(child_pid), "the engine outlived its launcher"
        assert marker.read_text() == "stopped gracefully"
    finally:
        launcher.kill()
        if _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (already exited, reparented, not yet reaped) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


PRESET = REPO / "presets" / "smollm2-135m-strided-cpu.yaml"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupt_mid_run_then_restart_on_a_tiny_model(tmp_path, tiny_smollm2_dir, sig):
    interrupt_then_restart(tmp_path, [f"base_model={tiny_smollm2_dir}", "bf16=false"], sig, timeout=300)


def interrupt_then_restart(tmp_path, overrides, sig, timeout):
    """`python -m ebft_engine train` on the strided CPU preset, `sig` to its process group after
    step 3 (past the step-2 checkpoint), then the same command again: it must end at step 6 with
    one metrics record per step. SIGTERM must first stop it cleanly: checkpoint, status, 143."""
    if not PRESET.is_file():
        pytest.fail(f"{PRESET} is missing")
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "ebft_engine", "train", str(PRESET), f"output_dir={run}",
            "max_steps=6", "save_steps=2", "logging_steps=1", *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("EBFT_RUN_DIR", None)
    env.pop("EBFT_PARENT_PID", None)
    log = open(tmp_path / "trainer.log", "ab")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            steps = [r["step"] for r in metric_records(run)] if (run / "metrics.jsonl").exists() else []
            if steps and steps[-1] >= 3:  # past the step-2 checkpoint, before the step-4 one
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    logged = [r["step"] for r in metric_records(run)]
    assert logged[:3] == [1, 2, 3]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, (tmp_path / "trainer.log").read_text()[-3000:]
        events = read_records(run / "metrics.jsonl")
        stopped = events[-1]
        assert stopped["event"] == "status" and stopped["phase"] == "stopped"
        assert stopped["step"] == logged[-1] and (run / "checkpoints" / f"step-{logged[-1]:06d}").is_dir()

    done = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, timeout=timeout)
    log.close()
    assert done.returncode == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    assert [r["step"] for r in metric_records(run)] == [1, 2, 3, 4, 5, 6]
    events = read_records(run / "metrics.jsonl")
    assert events[-1]["phase"] == "done"
    assert [e["resumed_from"] for e in events if e["event"] == "run"][-1] is not None
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_config_yaml_records_what_runs_here(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    launcher_copy = "# resolved by ebft from preset.yaml\n" + tiny_cfg(run, max_steps=2).to_yaml()
    (run / "config.yaml").write_text(launcher_copy)
    assert run_tiny(tiny_cfg(run, max_steps=2, save_steps=2)) == 0
    assert (run / "config.yaml").read_text() == launcher_copy  # equivalent: left as it is
    # start over with another learning rate, killed before its first checkpoint, then resumed
    cfg = tiny_cfg(run, max_steps=4, save_steps=4, learning_rate=1e-3)
    killed_in_step(3, cfg, resume=False, overwrite=True)
    assert "learning_rate: 0.001" in (run / "config.yaml").read_text()
    assert run_tiny(cfg) == 0
    assert [r["step"] for r in metric_records(run)] == [1, 2, 3, 4]
