"""The `ebft` command line (Typer). `ebft-tui` is `ebft tui`.

Commands follow torchtune's `tune` (ls / cat / cp / validate / run) plus serve, watch, gpus, eval
and tui. Every PRESET/CONFIG argument takes a preset name or a path; `key=value` items override
config keys (dotted for nested: `ebft.stride=16`). User errors print one red line naming the key
or file and what to do, and exit 2 (never a traceback).

No torch, no ebft_engine, no Textual at import time: the engine runs as `python -m ebft_engine`
subprocesses and Textual is imported inside the commands that open the app.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ebft_tui import __version__
from ebft_tui.engine import (ConfigInvalid, EngineError, engine_argv, engine_env, explain_key,
                             validate as engine_validate)
from ebft_tui.overrides import OverrideError, parse_overrides, split_args
from ebft_tui.presets import PresetNotFound, complete_preset, list_presets, resolve_preset
from ebft_tui.runs.lifeline import Lifeline, exit_code
from ebft_tui.runs.lock import RunDirLocked
from ebft_tui.runs.plan import PlanError

app = typer.Typer(
    name="ebft",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    add_completion=True,
    help="Energy-Based Fine-Tuning: list presets, validate configs, launch and watch runs.",
    epilog="Start with [bold]ebft ls[/bold], then [bold]ebft run PRESET[/bold] (add [bold]--headless[/bold] over SSH).",
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

PresetArg = Annotated[str, typer.Argument(help="Preset name (see `ebft ls`) or a YAML file path.",
                                          autocompletion=complete_preset, show_default=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(
    help="key=value overrides, e.g. max_steps=5 ebft.stride=16 learning_rate=1e-5.", show_default=False)]


class UserError(Exception):
    """A mistake the user can fix; the message says what to do."""


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def print_problems(problems: list[tuple[str, str]], source: str) -> None:
    for key, message in problems:
        where = f"[bold]{escape(key)}[/bold]: " if key else ""
        err.print(f"[red]error:[/red] {where}{escape(message)}")
    n = len(problems)
    err.print(f"[red]{n} problem{'s' if n != 1 else ''}[/red] in {escape(source)}: fix the key{'s' if n != 1 else ''} "
              "above in the file or override with key=value (`ebft cat` shows the preset).")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Map our own exceptions to one red line and exit code 2."""
    try:
        yield
    except ConfigInvalid as e:
        print_problems(e.problems, e.source or "the config")
        raise typer.Exit(2) from None
    except (PresetNotFound, OverrideError, EngineError, UserError) as e:
        raise fail(str(e)) from None
    except (FileNotFoundError, PlanError, RunDirLocked) as e:
        raise fail(str(e)) from None


def _check_overrides(items: list[str]) -> list[str]:
    parse_overrides(items)  # raises OverrideError naming the item
    return items


def _parse_gpus(text: str | None) -> list[int] | None:
    if text is None:
        return None
    t = text.strip().lower()
    if t in ("", "cpu", "none"):
        return []
    try:
        return [int(x) for x in t.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--gpus {text!r}: give GPU indices like 0,1 (see `ebft gpus`) or 'cpu'") from None


def _run_engine(argv: list[str], death_signal: int = signal.SIGKILL) -> int:
    """Run an engine command in the foreground; its exit code (128+N when signal N ended it).

    The engine gets its own session (so the lifeline's guard can take its whole group down if this
    process dies, SIGKILL included); Ctrl+C, SIGTERM and SIGHUP that reach us are passed on to its
    group, and we wait for it to finish its own graceful stop."""
    lifeline = Lifeline()
    try:
        proc = subprocess.Popen(lifeline.argv(argv, death_signal), env=engine_env(), pass_fds=lifeline.pass_fds,
                                start_new_session=True)
    except OSError as e:
        lifeline.close()
        raise UserError(f"cannot run the engine ({argv[0]}): {e}") from None

    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        return exit_code(proc.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lifeline.close()


# ----------------------------------------------------------------------------------- commands
@app.command("ls")
def ls_cmd() -> None:
    """List the presets: name, mode, model, device and description.

    [dim]Example: ebft ls[/dim]
    """
    presets = list_presets()
    if not presets:
        raise fail("no presets found (looked in ./presets and the ebft checkout's presets/)")
    rows = [(p.name, p.mode, p.model, p.device, p.description) for p in presets]
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    # Names are what users copy: never cut them; the model and the description give way.
    table.add_column("PRESET", no_wrap=True, min_width=max(len(r[0]) for r in rows))
    table.add_column("MODE", no_wrap=True)
    table.add_column("MODEL", overflow="fold", ratio=1)
    table.add_column("DEVICE", no_wrap=True)
    table.add_column("DESCRIPTION", overflow="fold", ratio=2)
    for row in rows:
        table.add_row(*row)
    console = out
    if not out.is_terminal:  # piped: never cut names to the default 80 columns
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(("PRESET", "MODE", "MODEL", "DEVICE", "DESCRIPTION"))]
        console = Console(highlight=False, width=sum(widths) + 2 * len(widths))
    console.print(table)
    out.print("[dim]Next: `ebft cat PRESET` to read one, `ebft run PRESET` to launch it.[/dim]")


@app.command("cat")
def cat_cmd(
    preset: PresetArg,
    overrides: OverridesArg = None,
    resolved: Annotated[bool, typer.Option("--resolved", help="Print the config after defaults and overrides (asks the engine).")] = False,
) -> None:
    """Print a preset (or config file), optionally fully resolved.

    [dim]Examples: ebft cat smollm2-135m-strided-cpu | ebft cat smollm2-135m-strided-cpu --resolved max_steps=5[/dim]
    """
    with user_errors():
        path = resolve_preset(preset)
        items = _check_overrides(list(overrides or []))
        if not resolved:
            if items:
                raise UserError("key=value overrides only apply with --resolved")
            sys.stdout.write(path.read_text(encoding="utf-8"))
            sys.stdout.flush()
            return
        res = engine_validate(path, items)
        res.raise_for_problems(str(path))
        for w in res.warnings:
            err.print(f"[yellow]warning:[/yellow] {escape(w)}")
        sys.stdout.write(yaml.safe_dump(res.config or {}, sort_keys=False))
        sys.stdout.flush()


@app.command("cp")
def cp_cmd(
    preset: PresetArg,
    dest: Annotated[Path, typer.Argument(help="File or folder to copy it to.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a preset to edit it (an existing file is left alone unless --force).

    [dim]Example: ebft cp smollm2-135m-strided-cpu my-run.yaml && ebft run my-run.yaml[/dim]
    """
    with user_errors():
        src = resolve_preset(preset)
        target = dest / src.name if dest.is_dir() else dest
        if target.exists() and not force:
            raise UserError(f"{target} exists: not overwritten (add --force to replace it, or give another name)")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        out.print(f"copied {escape(str(src))} -> {escape(str(target))}")
        out.print(f"[dim]Next: edit it, then `ebft validate {escape(str(target))}` and `ebft run {escape(str(target))}`.[/dim]")


@app.command("validate")
def validate_cmd(
    config: Annotated[Optional[str], typer.Argument(help="Preset name (see `ebft ls`) or a YAML file path.",
                                                    autocompletion=complete_preset, show_default=False)] = None,
    overrides: OverridesArg = None,
    explain: Annotated[Optional[str], typer.Option(
        "--explain", metavar="KEY", help="Say what ebft does with one key of an axolotl config "
                                         "(honoured, mapped, inert or refused, and why); no CONFIG needed.")] = None,
) -> None:
    """Check a config and overrides; print the resolved config or every problem (exit 2).

    [dim]Examples: ebft validate my-run.yaml max_steps=5 | ebft validate --explain save_strategy[/dim]
    """
    with user_errors():
        if explain is not None:
            rc, text, error = explain_key(explain)
            if text.strip():
                out.print(escape(text.rstrip()))
            if rc:
                err.print(f"[red]error:[/red] {escape(error.strip())}")
            raise typer.Exit(rc)
        if config is None:
            raise UserError("give a CONFIG (a preset name or a YAML file), or --explain KEY")
        path = resolve_preset(config)
        items = _check_overrides(list(overrides or []))
        res = engine_validate(path, items)
        for w in res.warnings:
            err.print(f"[yellow]warning:[/yellow] {escape(w)}")
        res.raise_for_problems(str(path))
        if res.config is not None:
            sys.stdout.write(yaml.safe_dump(res.config, sort_keys=False))
            sys.stdout.flush()
        err.print(f"[green]config is valid:[/green] {escape(str(path))}")


@app.command("train", context_settings=PASSTHROUGH)
def train_cmd(ctx: typer.Context, config: PresetArg, overrides: OverridesArg = None) -> None:
    """Train in the foreground (the engine's `train`, same exit code).

    Options such as --no-resume / --overwrite are passed on to the engine.

    [dim]Example: ebft train smollm2-135m-strided-cpu max_steps=3[/dim]
    """
    from ebft_tui.runs import lock

    with user_errors():
        path = resolve_preset(config)
        items, extra = split_args([*(overrides or []), *ctx.args])
        _check_overrides(items)
        run_dir = _train_run_dir(path, items)
        if run_dir is not None:
            lock.acquire(run_dir, command=f"ebft train {path.name}")  # raises RunDirLocked
        try:
            rc = _run_engine(engine_argv("train", str(path), *items, *extra))
        finally:
            if run_dir is not None:
                lock.release(run_dir)
    raise typer.Exit(rc)


def _train_run_dir(path: Path, items: list[str]) -> Path | None:
    """The output_dir the engine will train in (None when the config does not validate: the
    engine then says why itself)."""
    import os

    if os.environ.get("EBFT_RUN_DIR"):
        return Path(os.environ["EBFT_RUN_DIR"]).expanduser().resolve()
    res = engine_validate(path, items)
    out = (res.config or {}).get("output_dir") if res.ok else None
    return Path(str(out)).expanduser().resolve() if out else None


@app.command("serve", context_settings=PASSTHROUGH)
def serve_cmd(ctx: typer.Context, config: PresetArg, overrides: OverridesArg = None,
              port: Annotated[Optional[int], typer.Option(help="Port (default: trl.vllm_server_port; 0 = any free port).")] = None,
              host: Annotated[Optional[str], typer.Option(help="Address to listen on (default: trl.vllm_server_host, else 127.0.0.1).")] = None) -> None:
    """Start only the generation server for a config, in the foreground.

    Backend settings live in the config's `vllm:` section (override them as vllm.KEY=VALUE).

    [dim]Example: ebft serve smollm2-135m-structured-cpu --port 8000[/dim]
    """
    with user_errors():
        path = resolve_preset(config)
        items, extra = split_args([*(overrides or []), *ctx.args])
        _check_overrides(items)
        if extra:
            raise UserError(f"`ebft serve` takes key=value overrides, not {' '.join(extra)!r}: set backend options "
                            "under `vllm:` in the config, e.g. vllm.gpu_memory_utilization=0.5")
        argv = engine_argv("serve", str(path), *items)
        if port is not None:
            argv += ["--port", str(port)]
        if host is not None:
            argv += ["--host", host]
        rc = _run_engine(argv, death_signal=signal.SIGTERM)  # it forwards SIGTERM to vLLM's group
    raise typer.Exit(rc)


@app.command("eval", context_settings=PASSTHROUGH)
def eval_cmd(ctx: typer.Context, config: PresetArg, overrides: OverridesArg = None,
             adapter: Annotated[Optional[Path], typer.Option(help="A trained LoRA adapter folder (default: the base model).")] = None,
             unsafe_exec: Annotated[bool, typer.Option("--unsafe-exec", help="Where no OS sandbox (bubblewrap) works, run generated code anyway with only rlimits and a timeout; the eval record says so. See docs/security.md.")] = False) -> None:
    """Validation CE, CFM loss and sandboxed pass@1 (the engine's `eval`; other options pass on).

    pass@1 runs model-written code inside an OS jail (bubblewrap, else unshare); with none it is
    refused unless --unsafe-exec is given.

    [dim]Example: ebft eval smollm2-135m-strided-cpu --adapter outputs/x/checkpoints/final --max-rows 8[/dim]
    """
    with user_errors():
        path = resolve_preset(config)
        items, extra = split_args([*(overrides or []), *ctx.args])
        _check_overrides(items)
        argv = engine_argv("eval", str(path), *items, *extra)
        if adapter is not None:
            argv += ["--adapter", str(adapter)]
        if unsafe_exec:
            argv.append("--unsafe-exec")
        rc = _run_engine(argv)
    raise typer.Exit(rc)


@app.command("run")
def run_cmd(
    preset: PresetArg,
    overrides: OverridesArg = None,
    gpus: Annotated[Optional[str], typer.Option("--gpus", help="GPU indices, e.g. 0,1 (server, trainer) or 'cpu'. Default: free GPUs, else the CPU.")] = None,
    headless: Annotated[bool, typer.Option("--headless", help="No TUI: a live console (or plain lines when not a terminal).")] = False,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Where the run writes (default: the config's output_dir).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the run already in the run dir and start from scratch (default: resume it).")] = False,
) -> None:
    """Launch a run: server (structured modes) then trainer, watched live.

    Opens the TUI, unless --headless or stdout is not a terminal. A run dir that holds an earlier
    run resumes it; one where another launcher is running is refused (`ebft watch` it instead).
    Stop keeps its word: the first Ctrl+C lets the trainer finish its step and checkpoint, a second
    one kills it (resumable from the last checkpoint).

    [dim]Examples: ebft run smollm2-135m-strided-cpu max_steps=3 --headless | ebft run my.yaml --gpus 0,1[/dim]
    """
    from ebft_tui.headless import is_tty, run_headless
    from ebft_tui.runs.plan import build_plan

    with user_errors():
        path = resolve_preset(preset)
        items = _check_overrides(list(overrides or []))
        plan = build_plan(path, items, _parse_gpus(gpus), run_dir, fresh=overwrite)
    if headless or not is_tty():
        with user_errors():
            rc = run_headless(plan)
        raise typer.Exit(rc)
    from ebft_tui.tui.app import run_app

    rc = run_app(plan=plan)
    raise typer.Exit(rc if isinstance(rc, int) else 0)


@app.command("watch")
def watch_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (has metrics.jsonl / state.json).", show_default=False)],
    once: Annotated[bool, typer.Option("--once", help="Print the history and a summary, then exit.")] = False,
    tui: Annotated[bool, typer.Option("--tui", help="Open the read-only view in the terminal app instead.")] = False,
) -> None:
    """Follow an existing run read-only (e.g. from another SSH session) until it ends.

    [dim]Example: ebft watch outputs/smollm2-strided-cpu --once[/dim]
    """
    from ebft_tui.watch import NotARunDir, check_run_dir, watch_run

    try:
        if tui:
            check_run_dir(run_dir)
            from ebft_tui.tui.app import run_app

            rc = run_app(watch_dir=run_dir)
        else:
            rc = watch_run(run_dir, once=once, out=lambda line: print(line, flush=True))
    except NotARunDir as e:
        raise fail(f"{e}; give the run's output_dir") from None
    except KeyboardInterrupt:
        rc = 130
    raise typer.Exit(rc if isinstance(rc, int) else 0)


@app.command("gpus")
def gpus_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List GPUs (NVML indices) with utilisation and memory; says so when there are none."""
    from ebft_tui.system.gpus import list_gpus, nvml_unavailable_reason

    gpus = list_gpus()
    reason = nvml_unavailable_reason()
    if as_json:
        sys.stdout.write(json.dumps({"gpus": [g.as_dict() for g in gpus], "reason": reason}, indent=2) + "\n")
        return
    if not gpus:
        why = "NVML unavailable" if reason else "NVML sees none"
        out.print(f"no GPU found ({why}): runs will use the CPU")
        if reason:
            out.print(f"[dim]{escape(reason)}[/dim]")
        return
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("INDEX", "NAME", "UTIL", "MEMORY USED/TOTAL", "FREE", "TEMP"):
        table.add_column(col, no_wrap=True)
    for g in gpus:
        gib = lambda mb: "n/a" if mb is None else f"{mb / 1024:.1f} GiB"  # noqa: E731
        table.add_row(str(g.index), g.name, "n/a" if g.util_percent is None else f"{g.util_percent:.0f}%",
                      f"{gib(g.mem_used_mb)} / {gib(g.mem_total_mb)}", gib(g.mem_free_mb),
                      "n/a" if g.temperature_c is None else f"{g.temperature_c:.0f}C")
    out.print(table)
    out.print("[dim]Use them with `ebft run PRESET --gpus 0,1` (NVML order; CUDA_DEVICE_ORDER=PCI_BUS_ID is set for you).[/dim]")


@app.command("tui")
def tui_cmd(
    runs: Annotated[bool, typer.Option("--runs", help="Open on the runs screen (past and live runs under ./outputs).")] = False,
) -> None:
    """Open the terminal app on the preset picker (same as `ebft-tui`); ctrl+r shows the runs."""
    from ebft_tui.tui.app import run_app

    rc = run_app(show_runs=runs)
    raise typer.Exit(rc if isinstance(rc, int) else 0)


def _version(value: bool) -> None:
    if value:
        out.print(f"ebft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """Energy-Based Fine-Tuning: list presets, validate configs, launch and watch runs."""


def main() -> None:
    app(prog_name="ebft")


def tui_main() -> None:
    app(args=["tui", *sys.argv[1:]], prog_name="ebft-tui")
