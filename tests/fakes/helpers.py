"""Plans built by hand around the fakes, and process checks, for the ebft_tui tests."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ebft_tui.runs.layout import pid_alive
from ebft_tui.runs.plan import LaunchPlan, ProcessSpec, free_port

FAKES = Path(__file__).resolve().parent
FAKE_TRAINER = FAKES / "fake_trainer.py"
FAKE_SERVER = FAKES / "fake_server.py"


def trainer_spec(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> ProcessSpec:
    return ProcessSpec(
        name="trainer",
        argv=[sys.executable, str(FAKE_TRAINER), "--out", str(run_dir), *args],
        env=env if env is not None else {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ""},
        log_path=run_dir / "trainer.log",
    )


def server_spec(run_dir: Path, *args: str, port: int | None = None, timeout_s: float = 10.0,
                env: dict[str, str] | None = None) -> ProcessSpec:
    port = port or free_port()
    return ProcessSpec(
        name="server",
        argv=[sys.executable, str(FAKE_SERVER), "--port", str(port), *args],
        env=env if env is not None else {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ""},
        log_path=run_dir / "server.log",
        ready_url=f"http://127.0.0.1:{port}/health",
        ready_timeout_s=timeout_s,
    )


def fake_plan(run_dir: Path, trainer_args: tuple[str, ...] = (), server_args: tuple[str, ...] | None = None,
              **server_kw) -> LaunchPlan:
    run_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    if server_args is not None:
        procs.append(server_spec(run_dir, *server_args, **server_kw))
    procs.append(trainer_spec(run_dir, *trainer_args))
    return LaunchPlan(run_dir=run_dir, mode="structured" if server_args is not None else "strided",
                      processes=procs, resolved_config_path=None, gpus=[])


def wait_for_file(path: Path, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear")


def wait_dead(pids: list[int], timeout_s: float = 60.0) -> list[int]:
    """The pids still alive (not zombies) after waiting up to timeout_s (a hang guard: it returns
    as soon as they are gone, so a busy machine only makes it slower, never wrong)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if p and pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def group_gone(pgid: int) -> bool:
    from ebft_tui.runs.supervisor import group_members

    return not group_members(pgid)


def kill_quietly(pids: list[int]) -> None:
    import signal

    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
