"""The supervised children: name, state, PID, CPU%, RAM and GPU memory of each process group."""

from __future__ import annotations

from typing import Any, Iterable

from textual.widgets import DataTable

from ebft_tui.tui.messages import ProcRow

COLUMNS = (("name", "process"), ("state", "state"), ("pid", "PID"), ("cpu", "CPU%"),
           ("ram", "RAM"), ("gpu", "GPU mem"), ("exit", "exit"))


def _mb(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value:.0f} MiB"


class ProcessTable(DataTable):
    """One row per child, updated in place from `ProcRow`s."""

    DEFAULT_CSS = """
    ProcessTable { height: auto; max-height: 8; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.rows_by_name: dict[str, ProcRow] = {}

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show(self, rows: Iterable[ProcRow]) -> None:
        for row in rows:
            cells = {
                "name": row.name,
                "state": row.state,
                "pid": str(row.pid) if row.pid else "-",
                "cpu": f"{row.cpu_percent:.0f}" if row.cpu_percent is not None else "-",
                "ram": _mb(row.rss_mb) if row.rss_mb is not None else "-",
                "gpu": _mb(row.gpu_mem_mb) if row.gpu_mem_mb is not None else "n/a",
                "exit": "" if row.returncode is None else str(row.returncode),
            }
            if row.name not in self.rows_by_name:
                self.add_row(*(cells[key] for key, _ in COLUMNS), key=row.name)
            else:
                for key, value in cells.items():
                    self.update_cell(row.name, key, value)
            self.rows_by_name[row.name] = row
