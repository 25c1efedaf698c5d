"""The files of a run directory, in one place.

RUN_DIR/
  config.yaml     the fully resolved config that ran (`ebft run RUN_DIR/config.yaml` reproduces it)
  command.txt     the command lines (launcher and each child)
  env.json        the environment each child got on top of the launcher's (secrets redacted)
  state.json      supervisor state: processes, pids, exit codes, stopped-by-user vs crashed
  metrics.jsonl   the engine's structured log (docs/log-contract.md)
  trainer.log     trainer stdout+stderr
  server.log      generation server stdout+stderr (structured mode)
  launcher.lock   who supervises the run now (pid, host, start time): one launcher per run dir
  launch.json     the plan the TUI handed to its run keeper (runs/keeper.py)
  launcher.log    the keeper's news, one JSON line each (and its stderr)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def command(self) -> Path:
        return self.path / "command.txt"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def log(self, name: str) -> Path:
        return self.path / f"{name}.log"

    @property
    def trainer_log(self) -> Path:
        return self.log("trainer")

    @property
    def server_log(self) -> Path:
        return self.log("server")

    def ensure(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def read_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state, state)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def pid_alive(pid: int | None) -> bool:
    """True if the process exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # psutil.NoSuchProcess and friends
        return False
