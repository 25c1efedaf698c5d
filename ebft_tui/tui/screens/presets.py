"""The preset picker: a filterable table of presets beside a YAML preview of the highlighted one.

Typing goes to the filter (name, mode, model, description); up/down move the highlight; Enter
opens the parameter editor for the highlighted preset (code_browser / toolong layout). Enter is
a priority binding, so the footer shows it although the filter has focus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from rich.syntax import Syntax
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static


def preset_matches(preset: Any, text: str) -> bool:
    """Every word of the filter occurs in the preset's name, mode, model or description."""
    hay = " ".join(str(getattr(preset, f, "") or "") for f in ("name", "mode", "model", "description"))
    hay = hay.lower()
    return all(word in hay for word in text.lower().split())


def gpus_label(gpus: Any) -> str:
    if not gpus:
        return "CPU"
    return f"{gpus} GPU{'s' if gpus != 1 else ''}" if isinstance(gpus, int) else str(gpus)


class PresetsScreen(Screen):
    """Dismissed never: Enter calls `on_open(preset)` (the app pushes the editor)."""

    DEFAULT_CSS = """
    PresetsScreen #preset-left { width: 3fr; }
    PresetsScreen #preset-right { width: 2fr; border-left: tall $panel; }
    PresetsScreen #preset-filter { margin: 0 0 1 0; }
    PresetsScreen DataTable { height: 1fr; }
    PresetsScreen #preset-description { height: auto; padding: 0 1; color: $text-muted; }
    PresetsScreen #preset-preview { height: 1fr; }
    PresetsScreen #preset-empty { padding: 1 2; color: $warning; }
    """

    BINDINGS = [
        Binding("down", "move(1)", "Next", show=False),
        Binding("up", "move(-1)", "Previous", show=False),
        Binding("enter", "open", "Edit & run", priority=True),
        Binding("escape", "clear_filter", "Clear filter"),
    ]

    def __init__(self, presets: Sequence[Any], on_open: Callable[[Any], None]) -> None:
        super().__init__()
        self.presets = list(presets)
        self.shown: list[Any] = []
        self.preview_text = ""
        self.on_open = on_open

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal():
            with Vertical(id="preset-left"):
                yield Input(placeholder="type to filter presets (name, mode, model)", id="preset-filter")
                yield DataTable(cursor_type="row", zebra_stripes=True, id="preset-table")
                if not self.presets:
                    yield Static("No presets found (looked in ./presets and the packaged ones).",
                                 id="preset-empty")
            with Vertical(id="preset-right"):
                yield Static("", id="preset-description")
                with VerticalScroll(id="preset-preview"):
                    yield Static("", id="preset-yaml")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "ebft-tui"
        self.sub_title = "pick a preset"
        table = self.query_one(DataTable)
        table.add_columns("preset", "mode", "device", "model")
        self.refilter("")
        self.query_one("#preset-filter", Input).focus()

    def refilter(self, text: str) -> None:
        table = self.query_one(DataTable)
        table.clear()
        self.shown = [p for p in self.presets if preset_matches(p, text)]
        for p in self.shown:
            table.add_row(p.name, p.mode or "?", gpus_label(p.gpus), _short(p.model), key=p.name)
        self.preview(self.shown[0] if self.shown else None)

    @property
    def highlighted(self) -> Any | None:
        table = self.query_one(DataTable)
        if not self.shown or table.cursor_row is None or table.cursor_row >= len(self.shown):
            return None
        return self.shown[table.cursor_row]

    def preview(self, preset: Any | None) -> None:
        yaml_view = self.query_one("#preset-yaml", Static)
        desc = self.query_one("#preset-description", Static)
        self.preview_text = ""
        if preset is None:
            yaml_view.update("")
            desc.update("no preset matches the filter" if self.presets else "")
            return
        desc.update(f"[b]{preset.name}[/b]  {preset.description or ''}\n{preset.path}")
        try:
            text = Path(preset.path).read_text(encoding="utf-8")
        except OSError as exc:
            yaml_view.update(f"cannot read {preset.path}: {exc}")
            return
        self.preview_text = text
        yaml_view.update(Syntax(text, "yaml", theme="ansi_dark", word_wrap=True))

    @on(Input.Changed, "#preset-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.refilter(event.value)

    @on(Input.Submitted, "#preset-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        self.action_open()

    @on(DataTable.RowHighlighted)
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.preview(self.highlighted)

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_move(self, delta: int) -> None:
        table = self.query_one(DataTable)
        if delta > 0:
            table.action_cursor_down()
        else:
            table.action_cursor_up()

    def action_clear_filter(self) -> None:
        self.query_one("#preset-filter", Input).value = ""

    def action_open(self) -> None:
        preset = self.highlighted
        if preset is not None:
            self.on_open(preset)


def _short(model: Any) -> str:
    text = str(model or "?")
    return text if len(text) <= 38 else "…" + text[-37:]
