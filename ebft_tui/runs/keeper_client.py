"""The TUI's side of a run keeper (runs/keeper.py): start it, send it commands, read its news.

Pure asyncio, no Textual. The keeper is started in its own session and without a death signal (so
the run can outlive the TUI when the user leaves it running); it watches its stdin instead, which
the kernel closes the moment this process dies.

A plain `subprocess.Popen`, not an asyncio subprocess: asyncio's transport kills a child that is
still running when the transport is closed or collected, which would end a run the user chose to
leave going. Its stdout is read through the loop (`connect_read_pipe`); waiting is a poll.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ebft_tui
from ebft_tui.runs.lifeline import exit_code
from ebft_tui.runs.plan import LaunchPlan, plan_to_dict
from ebft_tui.runs.supervisor import ProcState

PACKAGE_ROOT = str(Path(ebft_tui.__file__).resolve().parents[1])


def keeper_env() -> dict[str, str]:
    """The launcher's environment, with this checkout first on PYTHONPATH (same code runs)."""
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_ROOT]
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, *parts])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class KeeperClient:
    def __init__(self, plan: LaunchPlan, on_message: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.plan = plan
        self.on_message = on_message
        self.proc: subprocess.Popen | None = None
        self._read_transport: asyncio.BaseTransport | None = None
        self.states: list[ProcState] = [ProcState(p.name, None, None, "starting") for p in plan.processes]
        self.finished: dict[str, Any] | None = None
        self.locked: dict[str, Any] | None = None
        self.launch_error: dict[str, Any] | None = None
        self.stop_requested_at: float | None = None
        self.detached = False
        self._reader: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        run_dir = Path(self.plan.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        launch = run_dir / "launch.json"
        tmp = launch.with_name(".launch.json.tmp")
        tmp.write_text(json.dumps(plan_to_dict(self.plan), indent=2, default=str), encoding="utf-8")
        os.replace(tmp, launch)
        self.finished = self.locked = self.launch_error = None
        self.stop_requested_at = None
        with open(run_dir / "launcher.log", "ab") as log:
            log.write(f"[{time.strftime('%H:%M:%S')}] keeper starting for pid {os.getpid()}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ebft_tui.runs.keeper", str(launch)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                env=keeper_env(), cwd=os.getcwd(),
            )
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=4 * 2**20)
        self._read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self.proc.stdout)
        self._reader = loop.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, OSError):  # an over-long line: skip it
                continue
            if not line:
                return
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(msg, dict):
                continue
            self._fold(msg)
            if self.on_message is not None:
                try:
                    self.on_message(msg)
                except Exception:  # a broken UI callback must not stop the news
                    pass

    def _fold(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if isinstance(msg.get("states"), list):
            self.states = [ProcState(**s) for s in msg["states"] if isinstance(s, dict)]
        if msg.get("stop_requested_at"):
            self.stop_requested_at = float(msg["stop_requested_at"])
        if kind == "finished":
            self.finished = msg
        elif kind == "locked":
            self.locked = msg
        elif kind == "launch_failed":
            self.launch_error = msg

    def send(self, command: str) -> bool:
        """Write one command (`stop`, `kill`, `restart`, `detach`); False if the keeper is gone."""
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.closed or self.proc.poll() is not None:
            return False
        try:
            self.proc.stdin.write(f"{command}\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        if command == "stop" and self.stop_requested_at is None:
            self.stop_requested_at = time.time()
        return True

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except (OSError, ValueError):
                pass
        if self._read_transport is not None:
            self._read_transport.close()

    def detach(self) -> None:
        """Leave the run to the keeper: it carries on alone; this side stops listening."""
        self.send("detach")
        self.detached = True
        self._close_pipes()

    async def wait(self, poll_s: float = 0.1) -> int:
        """Until the keeper has exited (the run is over): the trainer's exit code."""
        assert self.proc is not None
        while self.proc.poll() is None:
            await asyncio.sleep(poll_s)
        rc = self.proc.returncode
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)  # the news it wrote last
            except asyncio.TimeoutError:
                pass
        self._close_pipes()
        if self.finished is not None and isinstance(self.finished.get("returncode"), int):
            return int(self.finished["returncode"])
        return exit_code(rc)

    def kill_keeper(self) -> None:
        """Close the command pipe: to the keeper that is the launcher dying (it SIGKILLs the run)."""
        if not self.detached:
            self._close_pipes()
