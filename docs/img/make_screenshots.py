"""Take the README's screenshots from the app itself (`App.save_screenshot`, SVG; PNG when
`rsvg-convert` is installed).

    python docs/img/make_screenshots.py            # a real CPU run: smollm2-135m-strided-cpu
    python docs/img/make_screenshots.py --fake     # the test suite's fake trainer (seconds)

Writes docs/img/run-screen.svg (+ .png), run-screen-80x24.svg, plot.svg, runs.svg,
preset-picker.svg, parameters.svg.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ebft_tui.runs.plan import LaunchPlan, ProcessSpec, build_plan  # noqa: E402
from ebft_tui.tui.app import EbftApp  # noqa: E402
from ebft_tui.tui.screens.config_form import ConfigFormScreen  # noqa: E402
from ebft_tui.tui.screens.plot import PlotScreen  # noqa: E402
from ebft_tui.tui.screens.runs import RunsScreen  # noqa: E402

OUT = Path(__file__).resolve().parent
SIZE = (130, 42)


async def wait(pilot, cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        await pilot.pause(0.2)


def save(app: EbftApp, name: str) -> None:
    path = app.save_screenshot(filename=f"{name}.svg", path=str(OUT))
    print("wrote", path)
    if shutil.which("rsvg-convert"):
        subprocess.run(["rsvg-convert", "-o", str(OUT / f"{name}.png"), path], check=True)
        print("wrote", OUT / f"{name}.png")


async def picker_and_form() -> None:
    app = EbftApp(list_gpus=lambda: [], install_signal_handlers=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"smollm2")
        await pilot.pause(0.3)
        save(app, "preset-picker")
        await pilot.press("down", "down", "enter")
        await wait(pilot, lambda: isinstance(app.screen, ConfigFormScreen) and app.screen.ready, 60)
        await pilot.pause(0.3)
        save(app, "parameters")


async def run_screen(plan: LaunchPlan, steps: int, timeout: float) -> None:
    app = EbftApp(plan=plan, install_signal_handlers=False, runs_root=Path(plan.run_dir).parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await wait(pilot, lambda: (screen.history.step or 0) >= steps, timeout)
        await pilot.pause(1.5)  # a process sample and the last records
        save(app, "run-screen")
        screen.card("ebft/alignment").focus()
        await pilot.press("enter")
        await wait(pilot, lambda: isinstance(app.screen, PlotScreen), 10)
        await pilot.pause(0.5)
        save(app, "plot")
        await pilot.press("escape")
        await pilot.press("s")
        await pilot.pause(0.3)
        await pilot.press("y")  # stop: the step, a checkpoint (the countdown shows meanwhile)
        await wait(pilot, lambda: screen.finished is not None, timeout)
        await pilot.pause(0.5)
        await pilot.press("ctrl+r")
        await wait(pilot, lambda: isinstance(app.screen, RunsScreen) and app.screen.runs, 30)
        await pilot.pause(0.5)
        save(app, "runs")
    app = EbftApp(watch_dir=plan.run_dir, install_signal_handlers=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait(pilot, lambda: (app.screen.history.step or 0) >= steps, 30)
        await pilot.pause(0.5)
        save(app, "run-screen-80x24")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fake", action="store_true", help="use tests/fakes/fake_trainer.py instead of a real run")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    asyncio.run(picker_and_form())
    run_dir = Path(tempfile.mkdtemp(prefix="ebft-shot-")) / "outputs" / "smollm2-strided-cpu"
    run_dir.mkdir(parents=True)
    if args.fake:
        steps = args.steps or 40
        argv = [sys.executable, str(REPO / "tests/fakes/fake_trainer.py"), "--out", str(run_dir), "--steps",
                str(steps), "--interval", "0.05", "--hang", "--warning-at", str(steps // 2)]
        plan = LaunchPlan(run_dir, "strided", [ProcessSpec("trainer", argv, {}, run_dir / "trainer.log")], None, [])
        asyncio.run(run_screen(plan, steps, 60))
    else:
        steps = args.steps or 4
        # fp32 and two samples per document: the same run, a few times faster on a CPU
        plan = build_plan(REPO / "presets/smollm2-135m-strided-cpu.yaml",
                          [f"max_steps={steps + 2}", "logging_steps=1", "save_steps=1000", "bf16=false",
                           "ebft.n_samples_per_prompt=2"], [], run_dir)
        asyncio.run(run_screen(plan, steps, 1800))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
