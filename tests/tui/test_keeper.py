"""The run keeper: commands over its stdin, news on its stdout, and no run without its app
unless the app left the run to it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakes.helpers import fake_plan, kill_quietly, wait_dead, wait_for_file  # noqa: E402

from ebft_tui.runs import lock  # noqa: E402
from ebft_tui.runs.keeper_client import KeeperClient  # noqa: E402

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


async def test_stop_command_and_news(tmp_path):
    plan = fake_plan(tmp_path / "run", ("--steps", "1", "--hang", "--graceful", "--report", str(tmp_path / "t.json")))
    news: list[dict] = []
    client = KeeperClient(plan, news.append)
    await client.start()
    info = await asyncio.to_thread(wait_for_file, tmp_path / "t.json")
    assert lock.live_holder(plan.run_dir).pid == client.pid  # the keeper holds the run dir
    assert client.states[0].pid == info["pid"]
    assert client.send("stop")
    rc = await asyncio.wait_for(client.wait(), 60)
    assert rc == 128 + signal.SIGTERM
    kinds = [(m.get("type"), m.get("kind")) for m in news]
    assert ("event", "started") in kinds and ("event", "stopping") in kinds and kinds[-1][0] == "finished"
    assert news[-1]["stopped_by_user"] is True and not news[-1]["killed"]
    assert wait_dead([info["pid"]], 5) == []
    assert lock.live_holder(plan.run_dir) is None


async def test_a_locked_run_dir_is_refused(tmp_path):
    plan = fake_plan(tmp_path / "run", ("--steps", "1", "--report", str(tmp_path / "t.json")))
    lock.acquire(plan.run_dir, command="someone else")
    try:
        client = KeeperClient(plan)
        await client.start()
        rc = await asyncio.wait_for(client.wait(), 60)
        assert rc == 75 and client.locked is not None and "someone else" in client.locked["message"]
        assert not (tmp_path / "t.json").exists()  # nothing was started
    finally:
        lock.release(plan.run_dir)


APP = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from fakes.helpers import fake_plan
    from ebft_tui.runs.keeper_client import KeeperClient

    async def main():
        rd = Path({run_dir!r})
        plan = fake_plan(rd, ("--steps", "1", "--hang", "--ignore-sigterm", "--grandchild", "--no-watchdog",
                              "--report", str(rd / "t.json")))
        client = KeeperClient(plan)
        await client.start()
        print(client.pid, flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
""")


def test_sigkilled_app_takes_the_run_down_at_once(tmp_path):
    """The app (here a stand-in holding a KeeperClient) dies by SIGKILL: the keeper reads the end
    of its command pipe and kills the run, which ignores SIGTERM and has no watchdog."""
    script = tmp_path / "app.py"
    script.write_text(APP.format(tests=str(REPO / "tests"), run_dir=str(tmp_path / "run")))
    app = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        keeper = int(app.stdout.readline())
        info = wait_for_file(tmp_path / "run" / "t.json")
        pids = [keeper, info["pid"], info["grandchild"]]
        assert wait_dead(pids, 0.2) == pids
        os.kill(app.pid, signal.SIGKILL)
        app.wait(20)
        assert wait_dead(pids, 15) == []
        state = json.loads((tmp_path / "run" / "state.json").read_text())
        assert state["processes"][0]["returncode"] == -signal.SIGKILL
        assert lock.live_holder(tmp_path / "run") is None
    finally:
        app.kill()
        kill_quietly(pids)
