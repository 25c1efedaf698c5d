"""The help screen (`?` / F1): the keys of the screen underneath, read from its bindings."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Markdown, Static

INTRO = """\
# ebft-tui

Pick a preset, adjust its parameters, choose GPUs, then watch the run: metric cards show the last
value, the trend (green arrow = the way the spec wants it to move) and the spec's healthy range
(card colour: green good, yellow warn, red bad). Hints appear when a metric leaves its range.

Over SSH use `ssh -t host ebft-tui`, or run inside `tmux`; `ebft run --headless PRESET` needs no
terminal UI and `ebft watch RUN_DIR` re-attaches to any run read-only.
"""


def binding_rows(screen: Screen) -> list[tuple[str, str]]:
    """(key, description) for every shown binding active on `screen` and the app."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _, binding, enabled, tooltip in screen.active_bindings.values():
        if not binding.description or binding.key in seen:
            continue
        seen.add(binding.key)
        key = screen.app.get_key_display(binding)
        rows.append((key, binding.description + ("" if enabled else " (not now)")))
    return rows


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 90; height: 80%; border: thick $primary; background: $surface; padding: 0 1;
    }
    HelpScreen .help-keys { height: auto; margin: 1 0; }
    """

    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close")]

    def __init__(self, under: Screen) -> None:
        super().__init__()
        self.rows = binding_rows(under)

    def compose(self) -> ComposeResult:
        keys = "\n".join(f"[b]{key:>12}[/b]  {desc}" for key, desc in self.rows)
        with Vertical():
            with VerticalScroll():
                yield Markdown(INTRO)
                yield Static(keys or "(no keys on this screen)", classes="help-keys")
