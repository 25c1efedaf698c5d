"""`EbftApp`: preset picker -> parameter editor -> GPU picker -> run screen, or a run / watch view.

A run launched from the app is owned by a keeper process (`RunControl` → runs/keeper.py), the
parent of the server and trainer. The app sends it stop / kill / restart / detach and shows what it
reports, so quitting can leave the run going (`ebft watch` or the runs screen re-attach), while
an app that dies, SIGKILL included, closes the keeper's command pipe and the keeper kills the run
at once. Stop keeps its word: the trainer finishes its step and checkpoints; `k` stops at once.

`run_app(plan)` is what `ebft run` calls, `run_app()` what `ebft tui` / `ebft-tui` call, and
`run_app(watch_dir=...)` what `ebft watch` calls. Tests build `EbftApp(...)` with injected
factories (plan, presets, GPUs) and drive it with Pilot.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.markup import escape

from ebft_tui.runs.layout import RunDir, pid_alive
from ebft_tui.tui.messages import ProcRow, RunFinished, RunRequest, RunEvent
from ebft_tui.tui.screens.confirm import ChoiceScreen, ConfirmScreen
from ebft_tui.tui.screens.help import HelpScreen


def _proc_alive(state: Any) -> bool:
    """A process state that still has a running process behind it."""
    if getattr(state, "returncode", None) is not None or not getattr(state, "alive", True):
        return False
    return pid_alive(getattr(state, "pid", None))


class RunControl:
    """One run launched from the app, owned by its keeper process (runs/keeper.py).

    The keeper is the children's parent; the app sends it commands and reads its news. So the app
    can quit and leave the run going (`detach`), and if the app dies (even by SIGKILL) the keeper
    sees its command pipe close and kills the run at once."""

    def __init__(self, app: "EbftApp", plan: Any) -> None:
        from ebft_tui.runs.keeper_client import KeeperClient

        self.app = app
        self.plan = plan
        self.client = KeeperClient(plan, self._on_message)
        self.stopped_by_user = False
        self.killed = False
        self.returncode: int | None = None
        self.running = False
        self.detached = False
        self._samplers: dict[int, Any] = {}

    # -- lifecycle (event loop) --

    async def run(self) -> int | None:
        """Start the keeper and wait for the run to end (or for the app to leave it)."""
        self.running = True
        self.returncode = None
        launch_error: str | None = None
        try:
            await self.client.start()
            rc = await self.client.wait()
        except asyncio.CancelledError:
            self.client.kill_keeper()
            raise
        except Exception as exc:  # the keeper could not start: show it
            self.app.post_to_run_screen(RunEvent(exc))
            launch_error = str(exc) or exc.__class__.__name__
            rc = 1
        finally:
            self.running = False
        fin = self.client.finished or {}
        if self.client.locked is not None:
            launch_error = str(self.client.locked.get("message") or "the run directory is locked")
        elif self.client.launch_error is not None and launch_error is None:
            err = self.client.launch_error
            launch_error = f"{err.get('name')}: {err.get('reason')}"
        self.stopped_by_user = bool(fin.get("stopped_by_user")) or self.stopped_by_user
        self.killed = bool(fin.get("killed"))
        self.returncode = rc
        if not self.detached:
            self.app.post_to_run_screen(RunFinished(rc, self.stopped_by_user, launch_error, killed=self.killed))
        return rc

    def stop(self) -> None:
        """Graceful: the trainer finishes its step, checkpoints and exits."""
        self.stopped_by_user = True
        self.client.send("stop")

    def kill_now(self) -> None:
        """Stop now: SIGKILL the run (it resumes from its last checkpoint)."""
        self.stopped_by_user = True
        if not self.client.send("kill"):
            self.client.kill_keeper()

    def restart(self) -> None:
        self.stopped_by_user = False
        self.client.send("restart")

    def detach(self) -> None:
        self.detached = True
        self.client.detach()

    async def wait(self) -> None:
        while self.running:
            await asyncio.sleep(0.05)

    @property
    def stop_requested_at(self) -> float | None:
        return self.client.stop_requested_at

    @property
    def keeper_pid(self) -> int | None:
        return self.client.pid

    def states(self) -> list[Any]:
        return list(self.client.states)

    @property
    def alive(self) -> bool:
        return self.running or any(_proc_alive(s) for s in self.states())

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "event":
            self.app.post_to_run_screen(RunEvent(SimpleNamespace(**{k: message.get(k) for k in (
                "kind", "name", "pid", "returncode", "message", "log_tail")})))
        elif kind == "states":
            self.app.post_to_run_screen(RunEvent(SimpleNamespace(kind="states", name="", pid=None, returncode=None,
                                                                 message="", log_tail=[])))
        elif kind == "launch_failed":
            self.app.post_to_run_screen(RunEvent(LaunchProblem(
                f"{message.get('name')}: {message.get('reason')}", message.get("log_tail") or [])))
        elif kind == "locked":
            self.app.post_to_run_screen(RunEvent(LaunchProblem(str(message.get("message")), [])))

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


class LaunchProblem(RuntimeError):
    """A launch that failed in the keeper (readiness, spawn, the lock), with the log's last lines."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class EbftApp(App):
    """The ebft-tui application. Arguments after `plan`/`watch_dir` exist for tests."""

    CSS_PATH = "app.tcss"
    TITLE = "ebft-tui"
    ENABLE_COMMAND_PALETTE = True
    # Global keys are ones that never type text, so they work with a text field focused; `?`
    # opens help only where no text field has focus (it is a character you may want to type).
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True, id="quit"),
        Binding("f1", "help", "Help", priority=True, id="help"),
        Binding("question_mark", "help", "Help", show=False, id="help-question"),
        Binding("ctrl+r", "runs", "Runs", priority=True, id="runs"),
    ]

    def __init__(
        self,
        plan: Any | None = None,
        watch_dir: Path | None = None,
        *,
        plan_factory: Callable[..., Any] | None = None,
        presets: Callable[[], Sequence[Any]] | Sequence[Any] | None = None,
        schema: Callable[[], list[dict[str, Any]]] | None = None,
        validator: Callable[[Path, list[str]], Any] | None = None,
        list_gpus: Callable[[], Sequence[Any]] | None = None,
        install_signal_handlers: bool = True,
        runs_root: Path | None = None,
        show_runs: bool = False,
    ) -> None:
        super().__init__()
        self.initial_plan = plan
        self.watch_dir = Path(watch_dir) if watch_dir is not None else None
        self.plan_factory = plan_factory
        self.presets_source = presets
        self.schema_source = schema
        self.validator = validator
        self.list_gpus_fn = list_gpus
        self.install_signal_handlers = install_signal_handlers
        self.runs_root = Path(runs_root) if runs_root is not None else Path("outputs")
        self.show_runs = show_runs
        self.run_control: RunControl | None = None
        self.run_screen: Any | None = None
        self.exit_code = 0
        self.detached_run: Path | None = None
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
        elif self.show_runs:
            self.action_runs()
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
        """Textual installs none: an SSH hang-up would kill us without a word to the run."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._signals.append(sig)
            except (ValueError, RuntimeError, NotImplementedError):
                pass  # not the main thread / not supported

    def _on_signal(self, sig: int) -> None:
        """SIGTERM / SIGHUP: ask the run to stop (it still checkpoints, in its keeper) and exit now."""
        self.exit_code = 128 + int(sig)
        control = self.run_control
        if control is not None and control.alive:
            control.stop()
            control.detach()
        self.exit(self.exit_code)

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

        self.push_screen(GpuPickerScreen(mode, needed, list_gpus, config=resolved, preset_gpus=preset.gpus), picked)

    @work(thread=True, exclusive=True, group="plan")
    def launch(self, request: RunRequest) -> None:
        """Plan the run; a run dir held by a live launcher, or holding an earlier run, asks first."""
        from ebft_tui.runs.lock import RunDirLocked
        from ebft_tui.runs.plan import has_previous_run

        factory = self.plan_factory
        if factory is None:
            from ebft_tui.runs.plan import build_plan as factory
        self.call_from_thread(self.notify, "validating and preparing the run…", timeout=3)
        extra: dict[str, Any] = {}
        if request.run_dir is not None:
            extra["run_dir"] = request.run_dir
        if request.fresh:
            extra["fresh"] = True
        try:
            plan = factory(request.config_path, request.overrides, request.gpus, **extra)
        except RunDirLocked as exc:
            self.call_from_thread(self.ask_locked, request, exc)
            return
        except Exception as exc:  # ConfigInvalid, PlanError: say what to fix, stay on the form
            self.call_from_thread(self.notify, f"cannot start: {exc}", severity="error", timeout=10)
            return
        if not request.decided and has_previous_run(plan.run_dir):
            self.call_from_thread(self.ask_previous_run, request, Path(plan.run_dir))
            return
        self.call_from_thread(self.start_plan, plan)

    def ask_locked(self, request: RunRequest, exc: Any) -> None:
        """A live launcher holds the run dir: watch it, or start in a new folder."""
        run_dir = Path(exc.run_dir)

        def answer(choice: str | None) -> None:
            if choice == "watch":
                self.open_watch(run_dir)
            elif choice == "new":
                self.launch(replace(request, run_dir=next_free_dir(run_dir), decided=True))

        self.push_screen(ChoiceScreen(
            f"[b]{escape(str(run_dir))}[/b] is in use: {escape(exc.holder.describe())}.\n"
            "A second trainer there would mix both runs. Watch that run, or start this one in a new folder?",
            [("watch", "Watch it", "w", "primary"), ("new", f"New folder {next_free_dir(run_dir).name}", "n", "success")]),
            answer)

    def ask_previous_run(self, request: RunRequest, run_dir: Path) -> None:
        """The folder holds an earlier run: resume it, start over (deleting it), or a new folder."""

        def answer(choice: str | None) -> None:
            if choice == "resume":
                self.launch(replace(request, run_dir=run_dir, decided=True))
            elif choice == "new":
                self.launch(replace(request, run_dir=next_free_dir(run_dir), decided=True))
            elif choice == "overwrite":
                def confirmed(yes: bool | None) -> None:
                    if yes:
                        self.launch(replace(request, run_dir=run_dir, fresh=True, decided=True))

                self.push_screen(ConfirmScreen(f"Delete the run in {escape(str(run_dir))} (its checkpoints and "
                                               "log) and start from scratch?", yes="Delete & start"), confirmed)

        self.push_screen(ChoiceScreen(
            f"[b]{escape(str(run_dir))}[/b] holds an earlier run.",
            [("resume", "Resume it", "r", "success"), ("new", f"New folder {next_free_dir(run_dir).name}", "n", "primary"),
             ("overwrite", "Overwrite…", "o", "error")]), answer)

    def start_plan(self, plan: Any) -> None:
        from ebft_tui.tui.screens.run import RunScreen

        self.run_control = RunControl(self, plan)
        names = sorted((p.name for p in plan.processes), key=lambda n: (n != "trainer", n))
        logs = {name: plan.spec(name).log_path if hasattr(plan, "spec") else
                next(p.log_path for p in plan.processes if p.name == name) for name in names}
        self.run_screen = RunScreen(Path(plan.run_dir), logs, config=getattr(plan, "config", None),
                                    title=Path(plan.run_dir).name)
        self.push_screen(self.run_screen)
        for warning in getattr(plan, "warnings", []) or []:
            self.notify(str(warning), severity="warning", timeout=8)
        self.run_worker(self.run_control.run(), group="supervisor", exclusive=True, exit_on_error=False)

    def open_watch(self, run_dir: Path, attach: bool = False) -> None:
        """A run by its files. `attach` (the runs screen): its stop keys signal the launcher that
        holds it; plain watching (`ebft watch`, a locked run dir) never signals anything."""
        from ebft_tui.tui.screens.run import RunScreen

        rd = RunDir(run_dir)
        logs = {name: rd.log(name) for name in ("trainer", "server")
                if name == "trainer" or rd.log(name).exists()}
        screen = RunScreen(rd.path, logs, readonly=True, title=rd.path.name, attached=attach)
        if self.run_screen is None or not self.run_screen.is_attached:
            self.run_screen = screen if self.run_control is None else self.run_screen
        self.push_screen(screen)

    def post_to_run_screen(self, message: Any) -> None:
        if self.run_screen is not None:
            self.run_screen.post_message(message)

    # ---- runs ---------------------------------------------------------------------------------

    def action_runs(self) -> None:
        from ebft_tui.tui.screens.runs import RunsScreen

        if isinstance(self.screen, RunsScreen):
            return
        for screen in self.screen_stack:
            if isinstance(screen, RunsScreen):  # already open under this one: go back to it
                while self.screen is not screen:
                    self.pop_screen()
                return
        self.push_screen(RunsScreen(self.runs_root))

    # ---- stop / restart / quit ----------------------------------------------------------------

    def action_stop_run(self) -> None:
        control = self.run_control
        if control is None or not control.alive:
            self.notify("no run is going on")
            return
        if control.stop_requested_at is not None:
            self.action_kill_run()
            return

        def answer(yes: bool | None) -> None:
            if yes and control.alive:
                control.stop()
                if self.run_screen is not None:
                    self.run_screen.stopping_since(control.stop_requested_at)

        self.push_screen(ConfirmScreen(
            "Stop the run? The trainer finishes its current step, saves a checkpoint and exits; this "
            "can take as long as a step. Press [b]k[/b] meanwhile to stop at once.", yes="Stop"), answer)

    def action_kill_run(self) -> None:
        control = self.run_control
        if control is None or not control.alive:
            self.notify("no run is going on")
            return

        def answer(yes: bool | None) -> None:
            if yes:
                control.kill_now()

        self.push_screen(ConfirmScreen(
            "Stop now? The run is killed (SIGKILL): the steps since its last checkpoint are lost, and "
            "starting it again resumes from that checkpoint.", yes="Kill now"), answer)

    def action_restart_run(self) -> None:
        control = self.run_control
        if control is None:
            return

        def answer(yes: bool | None) -> None:
            if yes:
                if self.run_screen is not None:
                    self.run_screen.set_state("restarting…")
                if control.running:
                    control.restart()
                else:  # it had ended: run it again (the engine resumes from its checkpoint)
                    self.run_worker(control.run(), group="supervisor", exclusive=True, exit_on_error=False)

        self.push_screen(ConfirmScreen("Restart the run? It stops after its step (checkpoint) and starts "
                                       "again, resuming from that checkpoint.", yes="Restart"), answer)

    async def action_quit(self) -> None:
        if self._quitting or isinstance(self.screen, (ConfirmScreen, ChoiceScreen)):
            return
        control = self.run_control
        if control is None or not control.alive:
            self.exit(self.final_code())
            return
        run_dir = Path(control.plan.run_dir)

        def answer(choice: str | None) -> None:
            if choice == "leave":
                control.detach()
                self.detached_run = run_dir
                self.exit(0)
            elif choice == "stop":
                self.stop_and_exit()

        self.push_screen(ChoiceScreen(
            "A run is going on. Leave it running (follow it later with "
            f"[b]ebft watch {escape(str(run_dir))}[/b] or the runs screen), or stop it (after its step "
            "and a checkpoint) and quit?",
            [("leave", "Leave it running", "l", "success"), ("stop", "Stop it & quit", "s", "warning")]), answer)

    @work(exclusive=True, group="quit")
    async def stop_and_exit(self) -> None:
        """Stop the run (its step, a checkpoint; `k` cuts it short), wait for it, then exit."""
        self._quitting = True
        control = self.run_control
        if control is not None and control.alive:
            control.stop()
            if self.run_screen is not None and self.run_screen.is_attached:
                self.run_screen.stopping_since(control.stop_requested_at, quitting=True)
            await control.wait()
        self.exit(self.final_code())

    def final_code(self) -> int:
        """A signal's 128+N, else 130 for a run the user stopped, else the trainer's exit code."""
        if self.exit_code:
            return self.exit_code
        control = self.run_control
        if control is None or control.detached:
            return 0
        if control.stopped_by_user:
            return 130
        return control.returncode or 0

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.screen.dismiss()
            return
        self.push_screen(HelpScreen(self.screen))

    # ---- screenshots --------------------------------------------------------------------------

    def deliver_screenshot(self, filename: str | None = None, path: str | None = None,
                           time_format: str | None = None) -> str | None:
        """Into ~/Downloads when it exists, else the run dir on screen, else the current folder
        (over SSH there is rarely a Downloads folder); the notification says where."""
        if path is None:
            path = str(screenshot_dir(self.screen))
        return super().deliver_screenshot(filename, path, time_format)


def screenshot_dir(screen: Any) -> Path:
    from platformdirs import user_downloads_path

    try:
        downloads = Path(user_downloads_path())
    except Exception:
        downloads = None
    if downloads is not None and downloads.is_dir():
        return downloads
    run_dir = getattr(screen, "run_dir", None)
    if run_dir is not None and Path(run_dir).is_dir():
        return Path(run_dir)
    return Path.cwd()


def next_free_dir(run_dir: Path) -> Path:
    """`outputs/x-2`, `outputs/x-3`, ...: the first sibling that does not exist."""
    run_dir = Path(run_dir)
    base = run_dir.name
    for i in range(2, 10_000):
        candidate = run_dir.with_name(f"{base}-{i}")
        if not candidate.exists():
            return candidate
    return run_dir.with_name(f"{base}-{int(time.time())}")


def run_app(plan: Any | None = None, watch_dir: Path | None = None, show_runs: bool = False,
            runs_root: Path | None = None) -> int:
    """Run the app to completion; returns an exit code (the trainer's when a run was launched)."""
    app = EbftApp(plan=plan, watch_dir=watch_dir, show_runs=show_runs, runs_root=runs_root)
    try:
        result = app.run()
    finally:
        control = app.run_control
        if control is not None and not control.detached and control.running:
            control.kill_now()  # the app died without its stop path: never leave orphans
    if app.detached_run is not None:
        print(f"the run goes on in {app.detached_run}: follow it with `ebft watch {app.detached_run}` "
              "(or `ebft tui` → ctrl+r, the runs screen)")
    return result if isinstance(result, int) else app.final_code()
