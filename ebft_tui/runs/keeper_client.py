"""The TUI's side of a run keeper (runs/keeper.py): start it, send it commands, read its news.

Pure asyncio, no Textual. The keeper is started in its own session and without a death signal (so
the run can outlive the TUI when the user leaves it running); it watches its stdin instead, which
the kernel closes the moment this process dies.
"""

from __future__ import annotations

import asyncio
import json
import os
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
        self.proc: asyncio.subprocess.Process | None = None
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
        return self.proc is not None and self.proc.returncode is None

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
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ebft_tui.runs.keeper", str(launch),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                start_new_session=True, env=keeper_env(), cwd=os.getcwd(),
            )
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            try:
                line = await self.proc.stdout.readline()
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
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            return False
        try:
            self.proc.stdin.write(f"{command}\n".encode())
        except (BrokenPipeError, ConnectionResetError, RuntimeError, OSError):
            return False
        if command == "stop" and self.stop_requested_at is None:
            self.stop_requested_at = time.time()
        return True

    def detach(self) -> None:
        """Leave the run to the keeper: it carries on alone; this side stops listening."""
        self.send("detach")
        self.detached = True
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except (OSError, RuntimeError):
                pass

    async def wait(self) -> int:
        """Until the keeper has exited (the run is over): the trainer's exit code."""
        assert self.proc is not None
        rc = await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.proc.stdin is not None:  # all pipes closed: the transport is done with
            try:
                self.proc.stdin.close()
            except (OSError, RuntimeError):
                pass
        if self.finished is not None and isinstance(self.finished.get("returncode"), int):
            return int(self.finished["returncode"])
        return exit_code(rc)

    def kill_keeper(self) -> None:
        """Close the command pipe: to the keeper that is the launcher dying (it SIGKILLs the run)."""
        if self.proc is not None and self.proc.stdin is not None and not self.detached:
            try:
                self.proc.stdin.close()
            except (OSError, RuntimeError):
                pass
