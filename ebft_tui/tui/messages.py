"""Messages that carry run data up from followers and samplers to the screens (toolong's pattern).

Followers and samplers never touch widgets: they post one of these, the screen updates its
`MetricHistory` / tables and the widgets re-render from that state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


class MetricsBatch(Message):
    """New records from `metrics.jsonl`, in file order (all events, not only `metrics`)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        super().__init__()
        self.records = records


class LogLines(Message):
    """New complete lines of one child's log file (`trainer`, `server`)."""

    def __init__(self, name: str, lines: list[str]) -> None:
        super().__init__()
        self.name = name
        self.lines = lines


@dataclass
class ProcRow:
    """One row of the process table: a supervised child and what its group uses."""

    name: str
    state: str
    pid: int | None = None
    cpu_percent: float | None = None
    rss_mb: float | None = None
    gpu_mem_mb: float | None = None
    returncode: int | None = None


class ResourceSample(Message):
    """A fresh sample of the children's state and resource use (1 s, from a thread worker)."""

    def __init__(self, rows: list[ProcRow]) -> None:
        super().__init__()
        self.rows = rows

    def can_replace(self, message: Message) -> bool:
        # A newer sample makes an older, still queued one worthless.
        return isinstance(message, ResourceSample)


class RunEvent(Message):
    """Something the supervisor reported (a child started, became ready, exited, ...), or the
    exception that ended the launch (`LaunchFailed`: readiness failed, spawn failed)."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


class RunFinished(Message):
    """The supervised run ended: the trainer's exit code (None when stopped before it ran)."""

    def __init__(self, returncode: int | None, stopped_by_user: bool, launch_error: str | None = None,
                 killed: bool = False) -> None:
        super().__init__()
        self.returncode = returncode
        self.stopped_by_user = stopped_by_user
        self.launch_error = launch_error
        self.killed = killed


@dataclass
class RunRequest:
    """What the launch screens hand to the app: a config file, overrides and the chosen GPUs."""

    config_path: Any
    overrides: list[str] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)
    mode: str | None = None
    run_dir: Any = None  # None: the config's output_dir
    fresh: bool = False  # start over: the engine deletes the earlier run in run_dir
    decided: bool = False  # the user already chose what to do with an earlier run there
