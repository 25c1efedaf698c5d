"""Start, watch and stop the run's processes (generation server, trainer) as process groups.

Plain asyncio: the TUI runs it in an async worker, headless mode under `asyncio.run`. Spawn only
from the event-loop thread. Rules (shared/notes/tui-conventions.md §6):

- each child gets its own session/process group (`start_new_session=True`), stdin=/dev/null,
  stdout+stderr appended to RUN_DIR/<name>.log (files, never pipes: a stalled UI cannot block a
  child), `PYTHONUNBUFFERED=1` and `EBFT_PARENT_PID` (the engine's watchdog exits when the
  launcher dies, even by SIGKILL);
- start: server first, wait for /health (fail fast with the log tail if it dies or never gets
  ready), then the trainer;
- stop keeps its word: the trainer gets SIGTERM and is given all the time it needs to finish its
  step, checkpoint and exit (128+15); `kill()` ("stop now") SIGKILLs every group, and the run
  resumes from its last checkpoint. Then the server: SIGTERM, grace, SIGKILL. Each group is
  verified empty (grandchildren such as vLLM's EngineCore outlive their leader otherwise);
- when any process ends on its own, the others are stopped (a server without a trainer, or a
  trainer without its server, has nothing to do);
- RUN_DIR/state.json records pids, states, exit codes and stopped-by-user vs crashed;
- launcher death: the launcher's own SIGTERM/SIGHUP handlers call `stop()` (headless mode, the
  app); an atexit fallback kills every live group synchronously; against SIGKILL of the launcher
  each child is started through the lifeline shim (runs/lifeline.py): PR_SET_PDEATHSIG (the trainer
  gets SIGKILL, the server SIGTERM, which it forwards to vLLM's group) and a guard that signals
  the child's whole group when our lifeline pipe closes; the children's `EBFT_PARENT_PID`
  watchdog stays as the fallback.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shlex
import signal
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import psutil

from ebft_tui.runs.layout import RunDir
from ebft_tui.runs.lifeline import Lifeline, exit_code
from ebft_tui.runs.plan import LaunchPlan, ProcessSpec
from ebft_tui.runs.readiness import ReadinessError, wait_ready
from ebft_tui.runs.tail import tail_lines

log = logging.getLogger(__name__)

State = Literal["starting", "ready", "running", "exited", "stopped", "failed"]
EventKind = Literal["started", "ready", "exited", "failed", "stopping", "stopped"]
LOG_TAIL_LINES = 20
KILL_WAIT_S = 5.0


@dataclass
class ProcState:
    name: str
    pid: int | None
    pgid: int | None
    state: State
    returncode: int | None = None
    started_at: float | None = None
    ready_at: float | None = None
    ended_at: float | None = None
    stopped_by_user: bool = False

    @property
    def alive(self) -> bool:
        """Started and not ended (a process not started yet is "starting" with no pid)."""
        return self.pid is not None and self.state in ("starting", "ready", "running")


@dataclass
class SupervisorEvent:
    kind: EventKind
    name: str
    pid: int | None = None
    returncode: int | None = None
    message: str = ""
    log_tail: list[str] = field(default_factory=list)
    ts: float = field(default_factory=time.time)


class LaunchFailed(RuntimeError):
    def __init__(self, name: str, reason: str, log_tail: list[str] | None = None):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.log_tail = log_tail or []


# --------------------------------------------------------------------------- process groups
def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return out


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


async def _wait_group_empty(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if not group_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def reap_group(pgid: int, grace_s: float) -> bool:
    """Make sure nothing of the group survives: SIGTERM, grace, SIGKILL. True when empty."""
    if not group_members(pgid):
        return True
    signal_group(pgid, signal.SIGTERM)
    if await _wait_group_empty(pgid, grace_s):
        return True
    signal_group(pgid, signal.SIGKILL)
    ok = await _wait_group_empty(pgid, KILL_WAIT_S)
    if not ok:
        log.warning("process group %s still has members after SIGKILL: %s", pgid, group_members(pgid))
    return ok


# ------------------------------------------------------------------------------- atexit net
_live: "weakref.WeakSet[Supervisor]" = weakref.WeakSet()
_atexit_installed = False


def _kill_all_sync(grace_s: float = 2.0) -> None:
    """Last resort when the launcher exits without stopping its children (atexit, fatal signal)."""
    groups = [pg for sup in list(_live) for pg in sup._groups if group_members(pg)]
    if not groups:
        return
    for pg in groups:
        signal_group(pg, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(group_members(pg) for pg in groups):
        time.sleep(0.05)
    for pg in groups:
        if group_members(pg):
            signal_group(pg, signal.SIGKILL)


def _register(sup: "Supervisor") -> None:
    global _atexit_installed
    _live.add(sup)
    if not _atexit_installed:
        atexit.register(_kill_all_sync)
        _atexit_installed = True


# ------------------------------------------------------------------------------ supervisor
class Supervisor:
    def __init__(
        self,
        plan: LaunchPlan,
        on_event: Callable[[SupervisorEvent], None] | None = None,
        stop_grace_s: float = 10.0,
        ready_poll_s: float = 1.0,
        trainer_stop_timeout_s: float | None = None,
    ):
        self.plan = plan
        self.on_event = on_event
        self.stop_grace_s = stop_grace_s
        # None: a stop waits for the trainer's own graceful exit (step, checkpoint) however long
        self.trainer_stop_timeout_s = trainer_stop_timeout_s
        self.stop_requested_at: float | None = None
        self.killed = False
        self.ready_poll_s = ready_poll_s
        self.run_dir = RunDir(plan.run_dir)
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._states: dict[str, ProcState] = {
            p.name: ProcState(p.name, None, None, "starting") for p in plan.processes
        }
        self._watchers: dict[str, asyncio.Task] = {}
        self.lifeline = Lifeline()  # held for our lifetime: its guards take each group down with us
        # pgids not yet seen empty; only these are ever signalled (a pid, once free, can be reused)
        self._groups: set[int] = set()
        self._stop_lock: asyncio.Lock | None = None
        self._stopping = False
        self._stop_task: asyncio.Task | None = None
        self.user_stopped = False
        self._restarting = False
        self.launched_at: float | None = None
        self.status = "idle"

    # ------------------------------------------------------------------------ inspection
    def states(self) -> list[ProcState]:
        return [self._states[p.name] for p in self.plan.processes]

    def state(self, name: str) -> ProcState:
        return self._states[name]

    @property
    def running(self) -> bool:
        return any(st.alive for st in self._states.values())

    @property
    def trainer_name(self) -> str:
        names = [p.name for p in self.plan.processes]
        return "trainer" if "trainer" in names else names[-1]

    # --------------------------------------------------------------------------- events
    def _emit(self, kind: EventKind, name: str, message: str = "", log_tail: list[str] | None = None) -> None:
        st = self._states[name]
        ev = SupervisorEvent(kind, name, st.pid, st.returncode, message, log_tail or [])
        self._write_state()
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a broken UI callback must not orphan children
                log.exception("on_event callback failed for %s", ev)

    def _overall_status(self) -> str:
        if self.status == "idle":
            return "idle"
        if any(st.alive for st in self._states.values()):
            return "stopping" if self._stopping else self.status
        if self.user_stopped:
            return "stopped"
        tr = self._states.get(self.trainer_name)
        if tr is not None and tr.state == "exited" and tr.returncode == 0:
            return "finished"
        return "failed"

    def _write_state(self) -> None:
        data = {
            "status": self._overall_status(),
            "mode": self.plan.mode,
            "run_dir": str(self.plan.run_dir),
            "gpus": self.plan.gpus,
            "launcher_pid": os.getpid(),
            "launched_at": self.launched_at,
            "stop_requested_at": self.stop_requested_at,
            "updated_at": time.time(),
            "processes": [asdict(st) for st in self.states()],
        }
        try:
            self.run_dir.write_state(data)
        except OSError:
            log.exception("cannot write %s", self.run_dir.state)

    # ---------------------------------------------------------------------------- start
    async def start(self) -> None:
        """Start every process in plan order; a process with a `ready_url` must answer 200 on it
        before the next starts. Raises LaunchFailed (after stopping what was started)."""
        if self._stop_lock is None:
            self._stop_lock = asyncio.Lock()
        self._stopping = False
        self.user_stopped = False
        self.stop_requested_at = None
        self.killed = False
        self.launched_at = time.time()
        self.status = "starting"
        _register(self)
        self.run_dir.ensure()
        for spec in self.plan.processes:
            if self._stopping:
                break
            try:
                proc = await self._spawn(spec)
            except OSError as e:
                st = self._states[spec.name]
                st.state = "failed"
                self._emit("failed", spec.name, f"cannot start: {e}")
                await self.stop(reason="cleanup")
                raise LaunchFailed(spec.name, f"cannot start {spec.argv[0]}: {e}") from e
            st = self._states[spec.name]
            if spec.ready_url:
                try:
                    await wait_ready(spec.ready_url, proc, spec.ready_timeout_s, spec.log_path, poll_s=self.ready_poll_s)
                except ReadinessError as e:
                    if self._stopping:  # stopped while waiting: _watch reports "stopped"
                        await self.stop(reason="cleanup")
                        raise LaunchFailed(spec.name, "stopped before it was ready") from None
                    reported = st.state == "failed"  # _watch saw it die first
                    st.state = "failed"  # from here on _watch stays quiet about it
                    if proc.returncode is None:
                        await self._stop_one(spec.name, self.stop_grace_s)
                    st.returncode = proc.returncode
                    if not reported:
                        self._emit("failed", spec.name, e.reason, e.log_tail)
                    await self.stop(reason="cleanup")
                    raise LaunchFailed(spec.name, e.reason, e.log_tail) from None
                if st.alive:
                    st.state = "ready"
                    st.ready_at = time.time()
                    self._emit("ready", spec.name, f"ready after {st.ready_at - (st.started_at or st.ready_at):.1f} s")
            elif st.alive:
                st.state = "running"
                self._write_state()
        self.status = "running"
        self._write_state()

    def _child_env(self, spec: ProcessSpec) -> dict[str, str]:
        env = dict(os.environ)
        env.update(spec.env)
        env["PYTHONUNBUFFERED"] = "1"
        env["EBFT_PARENT_PID"] = str(os.getpid())
        env.setdefault("EBFT_RUN_DIR", str(self.plan.run_dir))
        return env

    async def _spawn(self, spec: ProcessSpec) -> asyncio.subprocess.Process:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as logf:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            logf.write(f"[ebft {stamp}] starting {spec.name}: {shlex.join(spec.argv)}\n".encode())
            logf.flush()
            proc = await asyncio.create_subprocess_exec(
                *self.lifeline.argv(spec.argv, spec.death_signal, self.stop_grace_s),
                pass_fds=self.lifeline.pass_fds,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=self._child_env(spec),
                cwd=str(spec.cwd) if spec.cwd else None,
            )
        self._procs[spec.name] = proc
        self._groups.add(proc.pid)
        self._states[spec.name] = ProcState(spec.name, proc.pid, proc.pid, "starting", started_at=time.time())
        self._watchers[spec.name] = asyncio.get_running_loop().create_task(self._watch(spec, proc))
        self._emit("started", spec.name, shlex.join(spec.argv))
        return proc

    async def _watch(self, spec: ProcessSpec, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        st = self._states[spec.name]
        st.returncode = rc
        st.ended_at = time.time()
        # Grandchildren of a leader that exited on its own may still hold the group (and a GPU).
        if not self._stopping:
            await self._reap(proc.pid, self.stop_grace_s)
        if st.state == "failed":  # already reported (readiness)
            pass
        elif self._stopping:
            st.state = "stopped"
            st.stopped_by_user = self.user_stopped
            self._emit("stopped", spec.name, f"stopped (exit code {rc})")
        elif rc == 0:
            st.state = "exited"
            self._emit("exited", spec.name, "exited (code 0)")
        else:
            st.state = "failed"
            self._emit("failed", spec.name, f"exited with code {rc}", tail_lines(spec.log_path, LOG_TAIL_LINES))
        if not self._stopping and self.status == "running" and any(s.alive for s in self._states.values()):
            # One process ended on its own: the others have nothing left to do.
            self._stop_task = asyncio.get_running_loop().create_task(self.stop(reason="cleanup"))

    # ----------------------------------------------------------------------------- stop
    async def _stop_one(self, name: str, grace_s: float | None) -> None:
        """SIGTERM the group, wait `grace_s` (None: as long as it takes), SIGKILL, reap."""
        proc = self._procs.get(name)
        if proc is None:
            return
        if proc.returncode is None:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except asyncio.TimeoutError:
                signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        # what the leader leaves in its group (its lifeline guard for a moment, grandchildren)
        await self._reap(proc.pid, self.stop_grace_s if grace_s is None else grace_s)
        watcher = self._watchers.get(name)
        if watcher is not None:
            await asyncio.shield(watcher)

    async def stop(self, grace_s: float | None = None, reason: Literal["user", "cleanup", "restart"] = "user") -> None:
        """Stop every process, trainer first, then the server; returns when all groups are empty.

        A user stop or a restart gives the trainer the time it needs to finish its step and
        checkpoint (unless `grace_s` or `trainer_stop_timeout_s` bounds it); `kill()` cuts it short.
        Other processes, and every process in a cleanup, get SIGTERM, `grace_s`, SIGKILL."""
        grace = self.stop_grace_s if grace_s is None else grace_s
        trainer_grace: float | None = grace
        if reason in ("user", "restart") and grace_s is None:
            trainer_grace = self.trainer_stop_timeout_s
        if self._stop_lock is None:
            self._stop_lock = asyncio.Lock()
        if reason == "user":
            self.user_stopped = True
        if any(s.alive for s in self._states.values()):
            self._stopping = True
            if self.stop_requested_at is None:
                self.stop_requested_at = time.time()
                tr = self._states.get(self.trainer_name)
                if reason != "cleanup" and tr is not None and tr.alive:
                    self._emit("stopping", self.trainer_name,
                               "stopping: finishing the step, then a checkpoint" if trainer_grace is None
                               else f"stopping (SIGKILL after {trainer_grace:.0f} s)")
        async with self._stop_lock:
            for spec in reversed(self.plan.processes):
                await self._stop_one(spec.name, trainer_grace if spec.name == self.trainer_name else grace)
        self._write_state()

    def kill(self) -> None:
        """SIGKILL every group now (second Ctrl+C). A `stop()` in flight then finishes quickly."""
        self._stopping = True
        self.user_stopped = True
        self.killed = True
        if self.stop_requested_at is None:
            self.stop_requested_at = time.time()
        for pgid in list(self._groups):
            signal_group(pgid, signal.SIGKILL)

    async def _reap(self, pgid: int, grace_s: float) -> None:
        if await reap_group(pgid, grace_s):
            self._groups.discard(pgid)

    async def wait(self) -> int:
        """Wait until the trainer has ended and every group is gone; the trainer's exit code
        (128+N when it died from signal N)."""
        while True:
            if self._restarting:  # a wait() from before restart() follows the new processes
                await asyncio.sleep(0.05)
                continue
            watchers = list(self._watchers.values())
            if not watchers:
                return 1  # nothing was started
            await asyncio.gather(*watchers, return_exceptions=True)
            if self._stop_task is not None:
                await asyncio.gather(self._stop_task, return_exceptions=True)
            if self._restarting:  # the old children ended because of a restart: follow the new ones
                continue
            if not any(s.alive for s in self._states.values()) and all(w.done() for w in self._watchers.values()):
                break
        self._write_state()
        rc = self._states[self.trainer_name].returncode
        if rc is None:
            return 1
        return exit_code(rc)

    async def restart(self) -> None:
        """Stop everything and start the plan again (the engine resumes from its last checkpoint)."""
        self._restarting = True
        try:
            await self.stop(reason="restart")
            self._procs.clear()
            self._watchers.clear()
            self._stop_task = None
            self._states = {p.name: ProcState(p.name, None, None, "starting") for p in self.plan.processes}
            await self.start()
        finally:
            self._restarting = False
