"""The run keeper: the process that owns a run the TUI launched, so the TUI can leave it running.

    python -m ebft_tui.runs.keeper RUN_DIR/launch.json

The TUI starts one keeper per run in its own session. The keeper takes the run-dir lock, runs the
`Supervisor` (server, readiness, trainer: the keeper is their parent, so their PR_SET_PDEATHSIG
fires if the keeper dies), and talks to the TUI over two pipes:

- stdin, commands, one per line: `stop` (graceful: the trainer finishes its step and checkpoints),
  `kill` (stop now: SIGKILL, resumable), `restart`, `detach` (the TUI leaves; the run goes on).
  End of file without `detach` means the TUI died (any way, SIGKILL included: the kernel closes
  the pipe): every child is SIGKILLed at once.
- stdout, JSON lines: `{"type": "event", ...}` for each supervisor event with every process's
  state, then `{"type": "finished", "returncode": ..., "stopped_by_user": ...}`. Once the TUI has
  gone, output goes only to RUN_DIR/launcher.log.

SIGTERM / SIGINT / SIGHUP to the keeper: a graceful stop; a second one: stop now. This is how a
re-attached `ebft watch` or the runs screen stops a detached run. The exit code is the trainer's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ebft_tui.runs import lock
from ebft_tui.runs.plan import LaunchPlan, plan_from_dict
from ebft_tui.runs.supervisor import LaunchFailed, Supervisor, SupervisorEvent

EXIT_LOCKED = 75  # EX_TEMPFAIL: another launcher holds the run dir


class Keeper:
    def __init__(self, plan: LaunchPlan, out=None) -> None:
        self.plan = plan
        self.out = out if out is not None else sys.stdout
        self.log_path = Path(plan.run_dir) / "launcher.log"
        self.detached = False
        self.pipe_open = True
        self.sup = Supervisor(plan, on_event=self._on_event)
        self.n_signals = 0
        self._task: asyncio.Task | None = None

    # ---------------------------------------------------------------------------- output
    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=str)
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
        except OSError:
            pass
        if self.pipe_open:
            try:
                self.out.write(line + "\n")
                self.out.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.pipe_open = False

    def _states(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.sup.states()]

    def _on_event(self, ev: SupervisorEvent) -> None:
        self.send({"type": "event", "kind": ev.kind, "name": ev.name, "pid": ev.pid, "returncode": ev.returncode,
                   "message": ev.message, "log_tail": ev.log_tail, "ts": ev.ts, "states": self._states(),
                   "stop_requested_at": self.sup.stop_requested_at})

    # --------------------------------------------------------------------------- control
    def command(self, cmd: str) -> None:
        loop = asyncio.get_running_loop()
        if cmd == "stop":
            loop.create_task(self.sup.stop(reason="user"))
        elif cmd == "kill":
            self.sup.kill()
        elif cmd == "restart":
            loop.create_task(self._restart())
        elif cmd == "detach":
            self.detached = True
            self.send({"type": "detached", "pid": os.getpid()})
            self.pipe_open = False

    async def _restart(self) -> None:
        try:
            await self.sup.restart()
            self.send({"type": "states", "states": self._states()})
        except LaunchFailed as e:
            self.send({"type": "launch_failed", "name": e.name, "reason": e.reason, "log_tail": e.log_tail})

    async def read_commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        except (OSError, ValueError):
            return  # no pipe (started by hand): signals only
        while True:
            line = await reader.readline()
            if not line:
                break
            self.command(line.decode(errors="replace").strip())
        if not self.detached:  # the TUI is gone without leaving the run to us: nothing survives it
            self.pipe_open = False
            self.sup.kill()

    def on_signal(self, sig: int) -> None:
        self.n_signals += 1
        if self.n_signals == 1:
            asyncio.get_running_loop().create_task(self.sup.stop(reason="user"))
        else:
            self.sup.kill()

    # ------------------------------------------------------------------------------- run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            lock.acquire(self.plan.run_dir, command=f"ebft run keeper for the TUI (pid {os.getppid()})")
        except lock.RunDirLocked as e:
            self.send({"type": "locked", "message": str(e), "holder": asdict(e.holder)})
            return EXIT_LOCKED
        reader = loop.create_task(self.read_commands())
        rc: int = 1
        launch_error: str | None = None
        try:
            try:
                await self.sup.start()
                self.send({"type": "states", "states": self._states()})  # now "running"
                rc = await self.sup.wait()
            except LaunchFailed as e:
                launch_error = str(e)
                self.send({"type": "launch_failed", "name": e.name, "reason": e.reason, "log_tail": e.log_tail})
                rc = 1
            self.send({"type": "finished", "returncode": rc, "stopped_by_user": self.sup.user_stopped,
                       "killed": self.sup.killed, "launch_error": launch_error, "states": self._states()})
        finally:
            if self.sup.running:
                self.sup.kill()
                await self.sup.stop(grace_s=2.0, reason="cleanup")
            reader.cancel()
            lock.release(self.plan.run_dir)
        return rc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ebft_tui.runs.keeper RUN_DIR/launch.json", file=sys.stderr)
        return 2
    plan = plan_from_dict(json.loads(Path(args[0]).read_text(encoding="utf-8")))
    return asyncio.run(Keeper(plan).run())


if __name__ == "__main__":
    sys.exit(main())
