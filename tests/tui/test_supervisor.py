"""Supervisor against real processes (tests/fakes): groups, grace, readiness, launcher death."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakes.helpers import (  # noqa: E402
    fake_plan, group_gone, kill_quietly, server_spec, trainer_spec, wait_dead, wait_for_file,
)

from ebft_tui.runs.plan import LaunchPlan  # noqa: E402
from ebft_tui.runs.supervisor import LaunchFailed, Supervisor  # noqa: E402

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]


def collect(events: list):
    return lambda ev: events.append(ev)


async def test_server_then_trainer_env_stdin_state(tmp_path):
    report_t, report_s = tmp_path / "t.json", tmp_path / "s.json"
    plan = fake_plan(tmp_path / "run", ("--steps", "3", "--report", str(report_t)),
                     ("--unhealthy-polls", "2", "--report", str(report_s)))
    plan.processes[0].env["CUDA_VISIBLE_DEVICES"] = "0"
    plan.processes[1].env["CUDA_VISIBLE_DEVICES"] = "1"
    events: list = []
    sup = Supervisor(plan, on_event=collect(events), ready_poll_s=0.1)
    await sup.start()
    assert [s.state for s in sup.states()] == ["ready", "running"]
    rc = await sup.wait()
    assert rc == 0
    kinds = [(e.kind, e.name) for e in events]
    assert kinds[:3] == [("started", "server"), ("ready", "server"), ("started", "trainer")]
    assert ("exited", "trainer") in kinds and ("stopped", "server") in kinds
    t, s = json.loads(report_t.read_text()), json.loads(report_s.read_text())
    assert t["stdin"] == "/dev/null"
    assert t["pgid"] == t["pid"] == t["sid"]  # own session and group
    assert t["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and t["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert s["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and s["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert t["env"]["EBFT_PARENT_PID"] == str(os.getpid())
    assert t["env"]["PYTHONUNBUFFERED"] == "1"
    state = json.loads((plan.run_dir / "state.json").read_text())
    assert state["status"] == "finished"
    assert [p["state"] for p in state["processes"]] == ["stopped", "exited"]
    assert state["processes"][0]["stopped_by_user"] is False
    log = (plan.run_dir / "trainer.log").read_text()
    assert "starting trainer" in log and "step 3/3" in log


async def test_stop_kills_the_whole_group(tmp_path):
    report = tmp_path / "t.json"
    plan = fake_plan(tmp_path / "run", ("--steps", "1", "--hang", "--grandchild", "--report", str(report)))
    events: list = []
    sup = Supervisor(plan, on_event=collect(events))
    await sup.start()
    info = await asyncio.to_thread(wait_for_file, report)
    assert info["grandchild"]
    await sup.stop(grace_s=30)
    assert sup.state("trainer").returncode == -signal.SIGTERM  # SIGTERM was enough: no SIGKILL
    assert wait_dead([info["pid"], info["grandchild"]]) == []
    assert group_gone(info["pgid"])  # killpg(pgid, 0) may still see zombies when init reaps lazily
    st = sup.state("trainer")
    assert st.state == "stopped" and st.stopped_by_user
    assert ("stopped", "trainer") in [(e.kind, e.name) for e in events]
    assert json.loads((plan.run_dir / "state.json").read_text())["status"] == "stopped"


async def test_sigterm_ignoring_child_is_killed_after_grace(tmp_path):
    report = tmp_path / "t.json"
    plan = fake_plan(tmp_path / "run", ("--steps", "1", "--hang", "--ignore-sigterm", "--grandchild",
                                        "--grandchild-ignores-term", "--report", str(report)))
    sup = Supervisor(plan)
    await sup.start()
    info = await asyncio.to_thread(wait_for_file, report)
    t0 = time.monotonic()
    await sup.stop(grace_s=0.5)
    assert time.monotonic() - t0 >= 0.5  # the grace was given (a lower bound: load cannot break it)
    assert sup.state("trainer").returncode == -signal.SIGKILL
    assert wait_dead([info["pid"], info["grandchild"]]) == []
    assert group_gone(info["pgid"])


async def test_grandchild_left_behind_by_an_exiting_leader_is_reaped(tmp_path):
    report = tmp_path / "t.json"
    # The leader exits 0 after its steps but the grandchild ignores SIGTERM and would live on.
    plan = fake_plan(tmp_path / "run", ("--steps", "1", "--report", str(report), "--crash-after", "1",
                                        "--exit-code", "0", "--grandchild", "--grandchild-ignores-term"))
    sup = Supervisor(plan, stop_grace_s=0.5)
    await sup.start()
    info = await asyncio.to_thread(wait_for_file, report)
    assert await sup.wait() == 0
    assert wait_dead([info["grandchild"]]) == []
    assert group_gone(info["pgid"])


async def test_server_exiting_early_fails_fast_with_log_tail(tmp_path):
    plan = fake_plan(tmp_path / "run", ("--steps", "1"), ("--exit-early", "7"), timeout_s=60)
    events: list = []
    sup = Supervisor(plan, on_event=collect(events), ready_poll_s=0.2)
    with pytest.raises(LaunchFailed) as ei:
        await sup.start()
    assert ei.value.name == "server"
    assert "exited with code 7" in ei.value.reason  # its exit, not the 60 s deadline
    assert any("CUDA out of memory" in ln for ln in ei.value.log_tail)
    failed = [e for e in events if e.kind == "failed"]
    assert len(failed) == 1 and failed[0].name == "server"
    assert any("CUDA out of memory" in ln for ln in failed[0].log_tail)
    assert sup.state("trainer").pid is None  # never started
    assert json.loads((plan.run_dir / "state.json").read_text())["status"] == "failed"


async def test_server_never_healthy_times_out_and_is_stopped(tmp_path):
    report = tmp_path / "s.json"
    plan = fake_plan(tmp_path / "run", ("--steps", "1"), ("--never-healthy", "--report", str(report)), timeout_s=1.5)
    sup = Supervisor(plan, ready_poll_s=0.2, stop_grace_s=2)
    t0 = time.monotonic()
    with pytest.raises(LaunchFailed) as ei:
        await sup.start()
    assert time.monotonic() - t0 >= 1.5  # waited out its deadline (a lower bound)
    assert "not ready after" in ei.value.reason and "HTTP 503" in ei.value.reason
    assert any("fake server" in ln for ln in ei.value.log_tail)
    info = json.loads(report.read_text())
    assert wait_dead([info["pid"]]) == [] and group_gone(info["pgid"])
    assert sup.state("server").state == "failed"


async def test_trainer_crash_stops_server_and_returns_its_code(tmp_path):
    report = tmp_path / "s.json"
    plan = fake_plan(tmp_path / "run", ("--steps", "5", "--crash-after", "2", "--exit-code", "3"),
                     ("--report", str(report)))
    events: list = []
    sup = Supervisor(plan, on_event=collect(events), ready_poll_s=0.1)
    await sup.start()
    assert await sup.wait() == 3
    failed = [e for e in events if e.kind == "failed"]
    assert failed and failed[0].name == "trainer" and failed[0].returncode == 3
    assert any("fake trainer crashing" in ln for ln in failed[0].log_tail)
    assert sup.state("server").state == "stopped"
    assert wait_dead([json.loads(report.read_text())["pid"]]) == []
    assert json.loads((plan.run_dir / "state.json").read_text())["status"] == "failed"


async def test_server_death_stops_the_trainer(tmp_path):
    plan = fake_plan(tmp_path / "run", ("--steps", "1", "--hang"), ())
    sup = Supervisor(plan, ready_poll_s=0.1)
    await sup.start()
    os.killpg(sup.state("server").pgid, signal.SIGKILL)
    rc = await asyncio.wait_for(sup.wait(), 20)
    assert rc == 128 + signal.SIGTERM  # stopped because its server died
    assert sup.state("server").state == "failed"
    assert sup.state("trainer").state == "stopped"


async def test_restart_starts_fresh_processes(tmp_path):
    plan = fake_plan(tmp_path / "run", ("--steps", "1", "--hang"))
    sup = Supervisor(plan)
    await sup.start()
    waiter = asyncio.create_task(sup.wait())  # as the TUI does: wait() spans the restart
    pid1 = sup.state("trainer").pid
    await sup.restart()
    pid2 = sup.state("trainer").pid
    assert pid2 and pid2 != pid1 and sup.state("trainer").state == "running"
    assert wait_dead([pid1]) == []
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await sup.stop(grace_s=2)
    assert await asyncio.wait_for(waiter, 10) == 128 + signal.SIGTERM
    assert wait_dead([pid2]) == []


LAUNCHER = textwrap.dedent("""
    import asyncio, json, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from fakes.helpers import fake_plan
    from ebft_tui.runs.supervisor import Supervisor

    async def main():
        rd = Path({run_dir!r})
        plan = fake_plan(rd, ("--steps", "1", "--hang", "--grandchild", "--report", str(rd / "t.json")),
                         ("--report", str(rd / "s.json")))
        sup = Supervisor(plan, ready_poll_s=0.1)
        await sup.start()
        print("started", flush=True)
        if {mode!r} == "return":
            while not (rd / "t.json").exists():
                await asyncio.sleep(0.05)
            return  # leave without stopping: the atexit net must clean up
        await asyncio.sleep(600)

    asyncio.run(main())
""")


def _launch(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER.format(tests=str(REPO / "tests"), run_dir=str(tmp_path / "run"), mode=mode))
    return subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("mode", ["sigkill", "return"])
def test_launcher_death_leaves_no_child(tmp_path, mode):
    launcher = _launch(tmp_path, mode)
    pids: list[int] = []
    try:
        assert launcher.stdout.readline().strip() == "started"
        t = wait_for_file(tmp_path / "run" / "t.json")
        s = wait_for_file(tmp_path / "run" / "s.json")
        pids = [t["pid"], t["grandchild"], s["pid"]]
        if mode == "sigkill":
            launcher.kill()
        launcher.wait(20)
        # The fakes' parent watchdog (like ebft_engine/watchdog.py) takes each group down.
        assert wait_dead(pids) == []
        assert group_gone(t["pgid"]) and group_gone(s["pgid"])
    finally:
        kill_quietly([launcher.pid, *pids])


async def test_wait_before_start_and_plan_without_server(tmp_path):
    plan = LaunchPlan(run_dir=tmp_path, mode="strided", processes=[trainer_spec(tmp_path, "--steps", "1")],
                      resolved_config_path=None, gpus=[])
    sup = Supervisor(plan)
    assert await sup.wait() == 1  # nothing started
    await sup.start()
    assert await sup.wait() == 0
    assert server_spec(tmp_path).ready_url.startswith("http://127.0.0.1:")


# ------------------------------------------------------------------ stop keeps its word
async def test_stop_waits_for_the_step_and_checkpoint_of_a_slow_trainer(tmp_path):
    """A user stop gives the trainer all the time its step needs: the grace (0.5 s here, shorter
    than the 3 s step) bounds only the other processes, so the trainer checkpoints and exits 143."""
    from ebft_tui.runs.tail import read_jsonl

    plan = fake_plan(tmp_path / "run", ("--steps", "5", "--interval", "3", "--graceful", "--phases"))
    events: list = []
    sup = Supervisor(plan, on_event=collect(events), stop_grace_s=0.5)
    await sup.start()
    metrics = plan.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 30
    while not any(r.get("event") == "phase" and r.get("step") == 1 for r in read_jsonl(metrics)):
        assert time.monotonic() < deadline, "the fake trainer never began its first step"
        await asyncio.sleep(0.05)
    await sup.stop()
    assert sup.state("trainer").returncode == 128 + signal.SIGTERM  # its own exit, not a SIGKILL
    assert await sup.wait() == 128 + signal.SIGTERM
    recs = read_jsonl(metrics)
    assert [r["step"] for r in recs if r["event"] == "checkpoint"] == [1]
    assert recs[-1]["event"] == "status" and recs[-1]["phase"] == "stopped"
    assert ("stopping", "trainer") in [(e.kind, e.name) for e in events]
    state = json.loads((plan.run_dir / "state.json").read_text())
    assert state["status"] == "stopped" and state["stop_requested_at"]


async def test_kill_cuts_a_graceful_stop_short(tmp_path):
    plan = fake_plan(tmp_path / "run", ("--steps", "3", "--interval", "60", "--graceful",
                                        "--report", str(tmp_path / "t.json")))
    sup = Supervisor(plan, stop_grace_s=0.5)
    await sup.start()
    info = await asyncio.to_thread(wait_for_file, tmp_path / "t.json")
    stopping = asyncio.create_task(sup.stop())
    while sup.stop_requested_at is None:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    assert not stopping.done()  # still waiting for the 60 s step: no SIGKILL behind our back
    sup.kill()
    await asyncio.wait_for(stopping, 20)
    assert sup.state("trainer").returncode == -signal.SIGKILL and sup.killed
    assert await sup.wait() == 128 + signal.SIGKILL
    assert wait_dead([info["pid"]], 5) == []


# -------------------------------------------------------------- lifeline (PR_SET_PDEATHSIG)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_sigkilled_launcher_takes_children_and_grandchildren_without_any_watchdog(tmp_path):
    """The fakes' own parent watchdog is off and everything ignores SIGTERM: only the lifeline
    (the death signal of each child, and the guard of each group) can end them."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER.format(tests=str(REPO / "tests"), run_dir=str(tmp_path / "run"), mode="sigkill")
                      .replace('"--grandchild", ', '"--grandchild", "--grandchild-ignores-term", "--ignore-sigterm", '
                               '"--no-watchdog", ')
                      .replace('("--report", str(rd / "s.json"))', '("--report", str(rd / "s.json"), "--no-watchdog")'))
    launcher = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        assert launcher.stdout.readline().strip() == "started"
        t = wait_for_file(tmp_path / "run" / "t.json")
        s = wait_for_file(tmp_path / "run" / "s.json")
        pids = [t["pid"], t["grandchild"], s["pid"]]
        assert wait_dead(pids, 0.2) == pids, "the children died before the launcher"
        launcher.kill()
        launcher.wait(20)
        assert wait_dead(pids, 15) == []
        assert group_gone(t["pgid"]) and group_gone(s["pgid"])
    finally:
        kill_quietly([launcher.pid, *pids])


def test_lifeline_shim_runs_the_real_program_with_its_pid_and_exit_code(tmp_path):
    from ebft_tui.runs.lifeline import Lifeline, exit_code, unguard_argv

    line = Lifeline()
    argv = [sys.executable, "-c", "import os,sys; print(os.getpid(), os.environ.get('EBFT_PDEATHSIG')); sys.exit(7)"]
    wrapped = line.argv(argv, signal.SIGTERM)
    assert unguard_argv(wrapped) == argv
    proc = subprocess.Popen(wrapped, stdout=subprocess.PIPE, text=True, pass_fds=line.pass_fds)
    out, _ = proc.communicate(timeout=30)
    pid, sig = out.split()
    assert int(pid) == proc.pid and int(sig) == signal.SIGTERM and proc.returncode == 7
    assert exit_code(-9) == 137 and exit_code(3) == 3
    line.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_sigkilled_ebft_train_wrapper_takes_the_engine_with_it(tmp_path):
    """`ebft train` runs the engine in the foreground; SIGKILL the wrapper and the engine (whose
    own watchdog is off: no EBFT_PARENT_PID) is gone too."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != "EBFT_PARENT_PID"}
    env.update(EBFT_RUN_DIR=str(tmp_path / "run"), PYTHONPATH=str(REPO))
    wrapper = subprocess.Popen([sys.executable, "-m", "ebft_tui", "train", "smollm2-135m-strided-cpu"], cwd=tmp_path,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    engine: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not engine:
            assert time.monotonic() < deadline and wrapper.poll() is None, "the engine did not start"
            try:
                engine = [p.pid for p in psutil.Process(wrapper.pid).children(recursive=True)
                          if p.cmdline()[1:3] == ["-m", "ebft_engine"]]  # exec'd, past the shim
            except psutil.Error:
                pass
            time.sleep(0.05)
        wrapper.kill()
        wrapper.wait(20)
        assert wait_dead(engine, 15) == []
    finally:
        wrapper.kill()
        kill_quietly(engine)
