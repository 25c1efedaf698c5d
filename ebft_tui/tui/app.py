"""`EbftApp`: preset picker -> parameter editor -> GPU picker -> run screen, or a run / watch view.

The app owns the run's supervisor (`RunControl`): it runs in an async worker on the app's event
loop (children are spawned from the loop, never from a thread: tui-conventions §6), and every way
out (ctrl+q after confirming, SIGTERM, SIGHUP, the `s` key) goes through the same stop path, which
signals the children's process groups before the app exits.

`run_app(plan)` is what `ebft run` calls, `run_app()` what `ebft tui` / `ebft-tui` call, and
`run_app(watch_dir=...)` what `ebft watch` calls. Tests build `EbftApp(...)` with injected
factories (plan, supervisor, presets, GPUs) and drive it with Pilot.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any, Callable, Sequence

from textual import work
from textual.app import App
from textual.binding import Binding

from ebft_tui.runs.layout import RunDir, pid_alive
from ebft_tui.tui.messages import ProcRow, RunFinished, RunRequest, RunEvent
from ebft_tui.tui.screens.confirm import ConfirmScreen
from ebft_tui.tui.screens.help import HelpScreen

STOP_GRACE_S = 10.0


def _proc_alive(state: Any) -> bool:
    """A process state that still has a running process behind it."""
    if getattr(state, "returncode", None) is not None or not getattr(state, "alive", True):
        return False
    return pid_alive(getattr(state, "pid", None))


class RunControl:
    """One supervised run: start, wait, stop, restart, and per-child resource samples."""

    def __init__(self, app: "EbftApp", plan: Any, supervisor_factory: Callable[..., Any]) -> None:
        self.app = app
        self.plan = plan
        self.supervisor = supervisor_factory(plan, self._on_event)
        self.stopped_by_user = False
        self.returncode: int | None = None
        self.running = False
        self._restart: asyncio.Future | None = None
        self._samplers: dict[int, Any] = {}

    # -- lifecycle (event loop) --

    async def run(self) -> int | None:
        """Start the children (server readiness first) and wait for the trainer to end."""
        self.running = True
        rc: int | None = None
        launch_error: str | None = None
        try:
            await self.supervisor.start()
            rc = await self.supervisor.wait()
            while self._restart is not None:  # wait() saw the old children go: follow the new ones
                restart, self._restart = self._restart, None
                await restart
                rc = await self.supervisor.wait()
        except asyncio.CancelledError:
            await self._stop_quietly()
            raise
        except Exception as exc:  # readiness failed, spawn failed: show it, leave nothing running
            self.app.post_to_run_screen(RunEvent(exc))
            launch_error = str(exc) or exc.__class__.__name__
            await self._stop_quietly()
            rc = getattr(exc, "returncode", None)
            if rc is None:
                rc = 1
        finally:
            self.running = False
        self.returncode = rc
        self.app.post_to_run_screen(RunFinished(rc, self.stopped_by_user, launch_error))
        return rc

    async def _stop_quietly(self) -> None:
        try:
            await self.supervisor.stop(STOP_GRACE_S)
        except Exception:
            self.kill_now()

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        self.stopped_by_user = True
        await self.supervisor.stop(grace_s)

    async def restart(self) -> None:
        """Stop and start again (the engine resumes from its last checkpoint); `run` keeps waiting."""
        self.stopped_by_user = False
        self._restart = asyncio.ensure_future(self.supervisor.restart())
        await self._restart

    def states(self) -> list[Any]:
        try:
            return list(self.supervisor.states())
        except Exception:
            return []

    @property
    def alive(self) -> bool:
        return self.running or any(_proc_alive(s) for s in self.states())

    def kill_now(self) -> None:
        """Last resort, synchronous: SIGKILL every child's process group (no loop needed)."""
        self.supervisor.kill()

    def _on_event(self, event: Any) -> None:
        self.app.post_to_run_screen(RunEvent(event))

    # -- sampling (thread worker) --

    def sample(self, states: Sequence[Any]) -> list[ProcRow]:
        from ebft_tui.system.gpus import gpu_memory_by_pid
        from ebft_tui.system.procs import GroupSampler

        gpu_mem = gpu_memory_by_pid()
        rows = []
        for s in states:
            pid, state = getattr(s, "pid", None), str(getattr(s, "state", "?"))
            row = ProcRow(name=s.name, state=state, pid=pid, returncode=getattr(s, "returncode", None))
            if pid and getattr(s, "returncode", None) is None:
                sampler = self._samplers.get(pid)
                if sampler is None:
                    sampler = self._samplers[pid] = GroupSampler(pid)
                sample = sampler.sample()
                if sample.n_procs:
                    row.cpu_percent = sample.cpu_percent
                    row.rss_mb = sample.rss_mb
                    used = [gpu_mem[p] for p in sample.pids if p in gpu_mem]
                    row.gpu_mem_mb = sum(used) if used else None
            rows.append(row)
        return rows


class EbftApp(App):
    """The ebft-tui application. Arguments after `plan`/`watch_dir` exist for tests."""

    CSS_PATH = "app.tcss"
    TITLE = "ebft-tui"
    ENABLE_COMMAND_PALETTE = True
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("question_mark,f1", "help", "Help"),
    ]

    def __init__(
        self,
        plan: Any | None = None,
        watch_dir: Path | None = None,
        *,
        plan_factory: Callable[..., Any] | None = None,
        supervisor_factory: Callable[..., Any] | None = None,
        presets: Callable[[], Sequence[Any]] | Sequence[Any] | None = None,
        schema: Callable[[], list[dict[str, Any]]] | None = None,
        validator: Callable[[Path, list[str]], Any] | None = None,
        list_gpus: Callable[[], Sequence[Any]] | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        super().__init__()
        self.initial_plan = plan
        self.watch_dir = Path(watch_dir) if watch_dir is not None else None
        self.plan_factory = plan_factory
        self.supervisor_factory = supervisor_factory
        self.presets_source = presets
        self.schema_source = schema
        self.validator = validator
        self.list_gpus_fn = list_gpus
        self.install_signal_handlers = install_signal_handlers
        self.run_control: RunControl | None = None
        self.run_screen: Any | None = None
        self.exit_code = 0
        self._signals: list[int] = []
        self._quitting = False

    # ---- start-up -----------------------------------------------------------------------------

    def on_mount(self) -> None:
        if self.install_signal_handlers:
            self._install_signal_handlers()
        if self.watch_dir is not None:
            self.open_watch(self.watch_dir)
        elif self.initial_plan is not None:
            self.start_plan(self.initial_plan)
        else:
            self.open_presets()

    def on_unmount(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            try:
                loop.remove_signal_handler(sig)
            except (ValueError, RuntimeError):
                pass
        self._signals.clear()

    def _install_signal_handlers(self) -> None:
        """Textual installs none: an SSH hang-up would kill us and orphan the children."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._signals.append(sig)
            except (ValueError, RuntimeError, NotImplementedError):
                pass  # not the main thread / not supported

    def _on_signal(self, sig: int) -> None:
        self.exit_code = 128 + int(sig)
        self.stop_and_exit()

    # ---- preset -> editor -> GPUs -> run ------------------------------------------------------

    def open_presets(self) -> None:
        from ebft_tui.tui.screens.presets import PresetsScreen

        source = self.presets_source
        if source is None:
            from ebft_tui.presets import list_presets

            source = list_presets
        presets = source() if callable(source) else list(source)
        self.push_screen(PresetsScreen(presets, on_open=self.open_preset))

    def open_preset(self, preset: Any) -> None:
        self.notify(f"loading the parameters of {preset.name}…", timeout=2)
        self._load_schema(preset)

    @work(thread=True, exclusive=True, group="schema")
    def _load_schema(self, preset: Any) -> None:
        schema = self.schema_source
        if schema is None:
            from ebft_tui.engine import schema_fields as schema
        try:
            fields = schema()
        except Exception as exc:
            self.call_from_thread(self.notify, f"cannot read the config schema: {exc}", severity="error")
            return
        self.call_from_thread(self._push_form, preset, fields)

    def _push_form(self, preset: Any, fields: list[dict[str, Any]]) -> None:
        from ebft_tui.tui.screens.config_form import ConfigFormScreen

        validator = self.validator
        if validator is None:
            from ebft_tui.engine import validate as validator
        self.push_screen(ConfigFormScreen(preset, fields, validator, on_start=self.choose_gpus))

    def choose_gpus(self, preset: Any, overrides: list[str], resolved: dict[str, Any] | None) -> None:
        from ebft_tui.presets import is_cpu_config, mode_of
        from ebft_tui.tui.screens.gpu_picker import GpuPickerScreen, gpus_needed

        mode = mode_of(resolved) if resolved else preset.mode
        cpu = is_cpu_config(resolved, preset.name) if resolved else not preset.gpus
        needed = gpus_needed(mode, 0 if cpu else None)
        list_gpus = self.list_gpus_fn
        if list_gpus is None:
            from ebft_tui.system.gpus import list_gpus

        def picked(gpus: list[int] | None) -> None:
            if gpus is not None:
                self.launch(RunRequest(Path(preset.path), overrides, gpus, mode))

        self.push_screen(GpuPickerScreen(mode, needed, list_gpus), picked)

    @work(thread=True, exclusive=True, group="plan")
    def launch(self, request: RunRequest) -> None:
        factory = self.plan_factory
        if factory is None:
            from ebft_tui.runs.plan import build_plan as factory
        self.call_from_thread(self.notify, "validating and preparing the run…", timeout=3)
        try:
            plan = factory(request.config_path, request.overrides, request.gpus)
        except Exception as exc:  # ConfigInvalid, PlanError: say what to fix, stay on the form
            self.call_from_thread(self.notify, f"cannot start: {exc}", severity="error", timeout=10)
            return
        self.call_from_thread(self.start_plan, plan)

    def start_plan(self, plan: Any) -> None:
        from ebft_tui.tui.screens.run import RunScreen

        factory = self.supervisor_factory
        if factory is None:
            from ebft_tui.runs.supervisor import Supervisor as factory
        self.run_control = RunControl(self, plan, factory)
        names = sorted((p.name for p in plan.processes), key=lambda n: (n != "trainer", n))
        logs = {name: plan.spec(name).log_path if hasattr(plan, "spec") else
                next(p.log_path for p in plan.processes if p.name == name) for name in names}
        self.run_screen = RunScreen(Path(plan.run_dir), logs, config=getattr(plan, "config", None),
                                    title=Path(plan.run_dir).name)
        self.push_screen(self.run_screen)
        for warning in getattr(plan, "warnings", []) or []:
            self.notify(str(warning), severity="warning", timeout=8)
        self.run_worker(self.run_control.run(), group="supervisor", exclusive=True, exit_on_error=False)

    def open_watch(self, run_dir: Path) -> None:
        from ebft_tui.tui.screens.run import RunScreen

        rd = RunDir(run_dir)
        logs = {name: rd.log(name) for name in ("trainer", "server")
                if name == "trainer" or rd.log(name).exists()}
        self.run_screen = RunScreen(rd.path, logs, readonly=True, title=rd.path.name)
        self.push_screen(self.run_screen)

    def post_to_run_screen(self, message: Any) -> None:
        if self.run_screen is not None:
            self.run_screen.post_message(message)

    # ---- stop / restart / quit ----------------------------------------------------------------

    def action_stop_run(self) -> None:
        if self.run_control is None or not self.run_control.alive:
            self.notify("no run is going on")
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._stop_run()

        self.push_screen(ConfirmScreen("Stop the run? Its children get SIGTERM, then SIGKILL after "
                                       f"{STOP_GRACE_S:.0f} s.", yes="Stop"), answer)

    @work(exclusive=True, group="control")
    async def _stop_run(self) -> None:
        if self.run_control is not None:
            if self.run_screen is not None:
                self.run_screen.set_state("stopping…")
            try:
                await self.run_control.stop()
            except Exception:
                self.run_control.kill_now()

    def action_restart_run(self) -> None:
        if self.run_control is None:
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._restart_run()

        self.push_screen(ConfirmScreen("Restart the run? It is stopped and started again, resuming "
                                       "from its last checkpoint.", yes="Restart"), answer)

    @work(exclusive=True, group="control")
    async def _restart_run(self) -> None:
        control = self.run_control
        if control is None:
            return
        if self.run_screen is not None:
            self.run_screen.set_state("restarting…")
        if control.running:
            try:
                await control.restart()
            except Exception:
                pass  # `RunControl.run` reports a failed relaunch on the run screen
        else:  # it had ended: run it again
            self.run_worker(control.run(), group="supervisor", exclusive=True, exit_on_error=False)

    async def action_quit(self) -> None:
        if self._quitting or isinstance(self.screen, ConfirmScreen):
            return
        if self.run_control is None or not self.run_control.alive:
            self.exit(self.final_code())
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.stop_and_exit()

        self.push_screen(ConfirmScreen("A run is going on. Stop it and quit?", yes="Stop & quit"), answer)

    @work(exclusive=True, group="quit")
    async def stop_and_exit(self) -> None:
        """The one way out while children run: stop them (grace, then kill), then exit."""
        self._quitting = True
        if self.run_control is not None and self.run_control.alive:
            if self.run_screen is not None and self.run_screen.is_attached:
                self.run_screen.set_state("stopping before quitting…")
            try:
                await self.run_control.stop()
            except Exception:
                self.run_control.kill_now()
        self.exit(self.final_code())

    def final_code(self) -> int:
        """A signal's 128+N, else 130 for a run the user stopped, else the trainer's exit code."""
        if self.exit_code:
            return self.exit_code
        control = self.run_control
        if control is None:
            return 0
        if control.stopped_by_user:
            return 130
        return control.returncode or 0

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.screen))


def run_app(plan: Any | None = None, watch_dir: Path | None = None) -> int:
    """Run the app to completion; returns an exit code (the trainer's when a run was launched)."""
    app = EbftApp(plan=plan, watch_dir=watch_dir)
    try:
        result = app.run()
    finally:
        control = app.run_control
        if control is not None and any(_proc_alive(s) for s in control.states()):
            control.kill_now()  # the app died without its stop path: never leave orphans
    return result if isinstance(result, int) else app.final_code()
