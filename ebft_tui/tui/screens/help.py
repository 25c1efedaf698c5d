"""The help screen (F1 anywhere, `?` where no text field has focus).

Read from the bindings themselves, in three groups: the keys of the screen underneath (and of
its focused widget), the app's keys that work everywhere, then text editing in input fields
(Textual's own `Input` bindings).
"""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen, Screen
from textual.widgets import Input, Markdown, Static

INTRO = """\
# ebft-tui

Pick a preset, adjust its parameters, choose GPUs, then watch the run: metric cards show the last
value, the trend (green arrow = the way the spec wants it to move), a plot over the steps and the
spec's healthy range (card colour: green good, yellow warn, red bad). Enter on a card opens its
plot; ctrl+r lists every run under `outputs/` (open one, compare two).

Over SSH use `ssh -t host ebft-tui`, or run inside `tmux`; `ebft run --headless PRESET` needs no
terminal UI and `ebft watch RUN_DIR` re-attaches to any run read-only.
"""

Row = tuple[str, str]


def _key(app: App, binding: Binding) -> str:
    return app.get_key_display(binding)


def binding_groups(screen: Screen) -> list[tuple[str, list[Row]]]:
    """[(title, [(key, description)])]: this screen's keys, the app's, text editing."""
    app = screen.app
    here: list[Row] = []
    everywhere: list[Row] = []
    seen: set[tuple[str, str]] = set()
    for _, (node, binding, enabled, _tooltip) in screen.active_bindings.items():
        if not binding.description or isinstance(node, Input):
            continue
        row = (_key(app, binding), binding.description + ("" if enabled else " (not now)"))
        if (row[0], binding.action) in seen:
            continue
        seen.add((row[0], binding.action))
        (everywhere if isinstance(node, App) else here).append(row)
    if app.ENABLE_COMMAND_PALETTE and not any(d.startswith("Command") for _, d in everywhere):
        everywhere.append(("ctrl+p", "Command palette (themes, screenshot, keys)"))
    editing: list[Row] = []
    for binding in Input.BINDINGS:
        if isinstance(binding, Binding) and binding.description:
            keys = ", ".join(app.get_key_display(Binding(k.strip(), binding.action)) for k in binding.key.split(","))
            editing.append((keys, binding.description))
    return [("This screen", here), ("Everywhere", everywhere), ("Text fields", editing)]


def binding_rows(screen: Screen) -> list[Row]:
    """Every row, in the order the help screen shows them."""
    return [row for _, rows in binding_groups(screen) for row in rows]


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 96; max-width: 100%; height: 90%; border: thick $primary; background: $surface; padding: 0 1;
    }
    HelpScreen .help-keys { height: auto; margin: 1 0 0 0; }
    """

    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close", priority=True)]

    def __init__(self, under: Screen) -> None:
        super().__init__()
        self.groups = binding_groups(under)
        self.rows = [row for _, rows in self.groups for row in rows]

    def compose(self) -> ComposeResult:
        blocks = []
        for title, rows in self.groups:
            if not rows:
                continue
            lines = [f"[b $accent]{title}[/]"] + [f"[b]{escape(key):>22}[/b]  {escape(desc)}" for key, desc in rows]
            blocks.append("\n".join(lines))
        with Vertical():
            with VerticalScroll():
                yield Static("\n\n".join(blocks) or "(no keys on this screen)", classes="help-keys")
                yield Markdown(INTRO)
