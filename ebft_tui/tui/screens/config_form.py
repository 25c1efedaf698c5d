"""The parameter editor: a form generated from the engine's schema, pre-filled from a preset.

Each schema field becomes a row (Input for numbers, text, lists and mappings; Select for enums;
Switch for booleans) grouped by section. Typing is checked at once (type, minimum); the whole
config is then checked by the engine (`ebft_engine validate`, a subprocess of about half a second)
in a debounced thread worker, and its problems are shown next to the field they name. Start stays
disabled while anything is invalid or a check is pending.

What the form hands on is the preset's path plus `key=value` overrides for the fields the user
changed, the same thing `ebft run PRESET k=v ...` takes, so `command.txt` reproduces the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.lazy import Lazy
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import (Button, Collapsible, Footer, Header, Input, Label, Select, Static,
                             Switch)
from textual.worker import get_current_worker

from ebft_tui.overrides import get_path, parse_value

DEBOUNCE_S = 0.35
EAGER_SECTIONS = 2
NUMERIC = ("int", "float")


def field_id(key: str) -> str:
    """A DOM id for a dotted key (`ebft.stride` -> `f-ebft--stride`)."""
    return "f-" + key.replace(".", "--").replace("/", "-")


def yaml_scalar(value: Any) -> str:
    """The text of an override value that `parse_value` reads back as exactly `value`."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exp = text.split("e")
            text = f"{mantissa}.0e{exp if exp[0] in '+-' else '+' + exp}"
        return text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value if value and parse_value(value) == value else json.dumps(value)
    return json.dumps(value)


def override_item(key: str, value: Any) -> str:
    return f"{key}={yaml_scalar(value)}"


def display_text(value: Any, ftype: str) -> str:
    """How a config value looks in an Input."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_text(text: str, field: dict[str, Any]) -> tuple[Any, str | None]:
    """(value, error) for what the user typed into a field's Input; '' means unset (None)."""
    ftype = field.get("type") or "str"
    text = text.strip()
    if text == "":
        return None, None
    value: Any
    if ftype == "int":
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            return None, "must be a whole number"
        return value, range_error(value, field)
    elif ftype == "float":
        try:
            value = float(text)
        except ValueError:
            return None, "must be a number (e.g. 0.5 or 1e-5)"
        if not math.isfinite(value):
            return None, "must be a finite number"
        return value, range_error(value, field)
    elif ftype == "list" and not text.startswith("["):
        value = text  # a single item or a pattern (`lora_target_modules: .*proj`): the engine decides
    elif ftype in ("list", "dict"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return None, f"must be a YAML {'list, e.g. [1, 2]' if ftype == 'list' else 'mapping, e.g. {a: 1}'}"
        if not isinstance(value, list if ftype == "list" else dict):
            return None, "must be a YAML list, e.g. [1, 2]" if ftype == "list" else "must be a YAML mapping, e.g. {a: 1}"
    else:
        value = text
    if isinstance(value, list) and field.get("item_type") in NUMERIC + ("str",):
        kind = {"int": int, "float": (int, float), "str": str}[field["item_type"]]
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            return None, f"must be a list of {field['item_type']} values"
    return value, None


def range_error(value: float, field: dict[str, Any]) -> str | None:
    """The schema's bounds (`min`/`max`, each possibly exclusive) as the message a user reads."""
    lo, hi = field.get("min"), field.get("max")
    if lo is not None:
        if field.get("min_exclusive") and value <= lo:
            return f"must be > {lo:g}"
        if value < lo:
            return f"must be ≥ {lo:g}"
    if hi is not None:
        if field.get("max_exclusive") and value >= hi:
            return f"must be < {hi:g}"
        if value > hi:
            return f"must be ≤ {hi:g}"
    return None


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            key = f"{prefix}{k}"
            out[key] = v
            if isinstance(v, dict):
                out.update(flatten(v, key + "."))
    return out


class FieldRow(Widget):
    """One schema field: key, editor, and a line for its problem (local or the engine's).

    A flat grid (key | editor, then the problem across both columns): a config has ~100 fields,
    and every container less per row is felt when the form opens."""

    DEFAULT_CSS = """
    FieldRow { layout: grid; grid-size: 2; grid-columns: 36 1fr; grid-rows: 1; height: auto; }
    FieldRow .field-key { width: 36; padding: 0 1 0 0; text-align: right; }
    FieldRow.-changed .field-key { text-style: bold; color: $accent; }
    FieldRow Input, FieldRow Select { width: 1fr; }
    FieldRow Switch { border: none; height: 1; padding: 0; width: auto; }
    FieldRow Switch:focus { border: none; background-tint: $foreground 10%; }
    FieldRow .field-error { color: $error; padding: 0 0 0 37; height: auto; display: none; column-span: 2; }
    FieldRow.-invalid .field-error { display: block; }
    FieldRow.-invalid Input, FieldRow.-invalid Select { background-tint: $error 25%; }
    """

    def __init__(self, field: dict[str, Any], initial: Any, in_preset: bool) -> None:
        super().__init__(id=field_id(field["key"]))
        self.field = field
        self.key = field["key"]
        self.ftype = field.get("type") or "str"
        self.in_preset = in_preset
        self.initial = initial
        self.local_error: str | None = None
        self.engine_error: str | None = None

    def compose(self) -> ComposeResult:
        yield Label(self.key, classes="field-key")
        editor = self._make_editor()
        editor.tooltip = str(self.field.get("description") or "") or None
        yield editor
        yield Static("", classes="field-error")

    def _make_editor(self) -> Input | Select | Switch:
        wid = self.id + "-w"
        choices = self.field.get("choices")
        if self.ftype == "bool":
            if self.initial is not None:
                return Switch(value=bool(self.initial), id=wid, animate=False)
            choices = [True, False]  # a nullable switch: unset lets the engine decide
        if choices:
            options = [(display_text(c, self.ftype), c) for c in choices]
            value = self.initial if self.initial in choices else Select.NULL
            return Select(options, value=value, allow_blank=self.initial is None or value is Select.NULL,
                          prompt="unset", id=wid, compact=True)
        default = self.field.get("default")
        placeholder = f"default: {display_text(default, self.ftype)}" if default not in (None, "", [], {}) else "unset"
        return Input(value=display_text(self.initial, self.ftype) if self.in_preset else "",
                     placeholder=placeholder, id=wid, compact=True)

    @property
    def editor(self) -> Input | Select | Switch:
        return self.query_one(f"#{self.id}-w")

    def read(self) -> tuple[Any, str | None]:
        """The field's current value (None = unset) and a local error, if any."""
        if not self.is_mounted:  # its section is still being mounted: untouched
            return self.baseline(), None
        w = self.editor
        if isinstance(w, Switch):
            return w.value, None
        if isinstance(w, Select):
            return (None if w.value is Select.NULL else w.value), None
        return parse_text(w.value, self.field)

    def baseline(self) -> Any:
        """The value the preset gives this field (None when it does not set it)."""
        return self.initial if self.in_preset else (self.initial if self.ftype in ("bool", "enum") else None)

    def changed(self) -> bool:
        value, error = self.read()
        return error is None and value != self.baseline()

    def on_mount(self) -> None:
        self.show_problem()

    def show_problem(self) -> None:
        if not self.is_mounted:
            return  # on_mount shows it
        message = self.local_error or self.engine_error
        self.query_one(".field-error", Static).update(message or "")
        self.set_class(bool(message), "-invalid")
        self.set_class(self.changed(), "-changed")


class ConfigFormScreen(Screen):
    """Edits one preset. Start calls `on_start(preset, overrides, resolved_config)`."""

    DEFAULT_CSS = """
    ConfigFormScreen #form-top { height: 1; padding: 0 1; margin-bottom: 1; }
    ConfigFormScreen #form-title { width: 1fr; }
    ConfigFormScreen #form-status { width: auto; padding: 0 1; }
    ConfigFormScreen #form-status.-bad { color: $error; }
    ConfigFormScreen #form-status.-ok { color: $success; }
    ConfigFormScreen #form-filter { width: 40; }
    ConfigFormScreen #start { margin-left: 1; }
    ConfigFormScreen #form-fields { height: 1fr; }
    ConfigFormScreen #form-problems { height: auto; max-height: 8; color: $error; padding: 0 1; }
    ConfigFormScreen #form-warnings { height: auto; max-height: 4; color: $warning; padding: 0 1; }
    ConfigFormScreen #field-help { height: 2; color: $text-muted; padding: 0 1; background: $panel; }
    ConfigFormScreen Collapsible { padding-bottom: 0; }
    ConfigFormScreen .section-body { height: auto; }
    """

    BINDINGS = [
        Binding("ctrl+s", "start", "Start", priority=True),
        Binding("ctrl+f", "find", "Find field", priority=True),
        Binding("slash", "find", "Find field", show=False),  # only where no text field has focus
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, preset: Any, fields: Sequence[dict[str, Any]],
                 validator: Callable[[Path, list[str]], Any],
                 on_start: Callable[[Any, list[str], dict[str, Any] | None], None]) -> None:
        super().__init__()
        self.preset = preset
        self.fields = [f for f in fields if f.get("key")]
        self.validator = validator
        self.on_start = on_start
        try:
            raw = yaml.safe_load(Path(preset.path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            raw = {}
        self.preset_config: dict[str, Any] = raw if isinstance(raw, dict) else {}
        self.flat = flatten(self.preset_config)
        self.rows: dict[str, FieldRow] = {}
        self.section_rows: dict[str | None, list[FieldRow]] = {}
        self.filter_text = ""
        self.generation = 0
        self.pending = True
        self.engine_problems: list[tuple[str, str]] = []
        self.engine_warnings: list[str] = []
        self.resolved: dict[str, Any] | None = None
        self._debounce = None

    # ---- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="form-top"):
            yield Static(f"[b]{self.preset.name}[/b] · {self.preset.mode}",
                         id="form-title")
            yield Input(placeholder="ctrl+f find a field", id="form-filter", compact=True)
            yield Static("checking…", id="form-status")
            yield Button("Start ▶", id="start", variant="success", disabled=True, compact=True)
        yield Static("", id="form-problems")
        yield Static("", id="form-warnings")
        with VerticalScroll(id="form-fields"):
            for i, (section, fields) in enumerate(self._sections()):
                set_here = any(f["key"] in self.flat for f in fields)
                rows = []
                for f in fields:
                    key = f["key"]
                    in_preset = key in self.flat
                    initial = self.flat[key] if in_preset else f.get("default")
                    rows.append(FieldRow(f, initial, in_preset))
                    self.rows[key] = rows[-1]
                coll = Collapsible(title=f"{section} ({len(fields)})", collapsed=not set_here,
                                   id="sec-" + field_id(section)[2:])
                self.section_rows[coll.id] = rows
                with coll:
                    # The first sections paint at once, the rest right after (a config has ~100
                    # fields; mounting them all before the first frame is felt).
                    body = Vertical(*rows, classes="section-body")
                    yield body if i < EAGER_SECTIONS else Lazy(body)
        yield Static("", id="field-help")
        yield Footer()

    def _sections(self) -> list[tuple[str, list[dict[str, Any]]]]:
        order: dict[str, list[dict[str, Any]]] = {}
        for f in self.fields:
            section = f.get("section") or (f["key"].split(".")[0] if "." in f["key"] else "general")
            order.setdefault(str(section), []).append(f)
        return list(order.items())

    def on_mount(self) -> None:
        self.title = "ebft-tui"
        self.sub_title = f"parameters of {self.preset.name}"
        for row in self.rows.values():
            row.show_problem()
        self.refresh_visibility()
        first = next((r for r in self.rows.values() if r.display), None)
        if first is not None:
            try:
                first.editor.focus()
            except Exception:
                pass
        self.schedule_validation(now=True)

    # ---- what the user changed ----------------------------------------------------------------

    def overrides(self) -> list[str]:
        items = []
        for key, row in self.rows.items():
            value, error = row.read()
            if error is None and value != row.baseline():
                items.append(override_item(key, value))
        return items

    def local_errors(self) -> dict[str, str]:
        return {key: row.local_error for key, row in self.rows.items() if row.local_error}

    @property
    def ready(self) -> bool:
        """Every field mounted and the engine's verdict in (what tests wait for)."""
        return not self.pending and all(row.is_mounted for row in self.rows.values())

    @property
    def n_problems(self) -> int:
        return len(self.local_errors()) + len(self.engine_problems)

    def _on_edit(self, row: FieldRow) -> None:
        row.local_error = row.read()[1]
        row.engine_error = None
        row.show_problem()
        if row.key == "ebft.mode":
            self.refresh_visibility()
        self.schedule_validation()

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "form-filter":
            self.filter_fields(event.value)
            return
        row = self._row_of(event.input)
        if row is not None:
            self._on_edit(row)

    @on(Select.Changed)
    @on(Switch.Changed)
    def _choice_changed(self, event: Select.Changed | Switch.Changed) -> None:
        row = self._row_of(event.control)
        if row is not None:
            self._on_edit(row)

    def _row_of(self, widget: Any) -> FieldRow | None:
        for node in widget.ancestors:
            if isinstance(node, FieldRow):
                return node
        return None

    def on_descendant_focus(self, event: Any) -> None:
        row = self._row_of(event.widget)
        help_line = self.query_one("#field-help", Static)
        if row is None:
            help_line.update("")
            return
        f = row.field
        bits = [f"[b]{row.key}[/b] ({row.ftype})"]
        if f.get("default") not in (None, "", [], {}):
            bits.append(f"default {display_text(f['default'], row.ftype)}")
        if f.get("choices"):
            bits.append("one of " + ", ".join(map(str, f["choices"])))
        help_line.update(" · ".join(bits) + "\n" + str(f.get("description") or ""))

    def current_mode(self) -> str:
        """`strided` or `structured`: what the mode field says now (fields of the other hide)."""
        row = self.rows.get("ebft.mode")
        if row is not None:
            value, error = row.read()
            if error is None and value:
                return str(value)
        return "strided" if str(self.preset.mode).startswith("strided") else "structured"

    def filter_fields(self, text: str) -> None:
        self.filter_text = text.strip().lower()
        self.refresh_visibility()

    def refresh_visibility(self) -> None:
        """Show the rows that match the find box and belong to the current mode."""
        text, mode = self.filter_text, self.current_mode()
        for key, row in self.rows.items():
            other_mode = row.field.get("mode") not in (None, mode)
            matches = not text or text in key.lower() or text in str(row.field.get("description", "")).lower()
            row.display = matches and not other_mode
        for coll in self.query(Collapsible):
            visible = any(r.display for r in self.section_rows.get(coll.id, ()))
            coll.display = visible
            if text and visible:
                coll.collapsed = False

    # ---- validation ---------------------------------------------------------------------------

    def schedule_validation(self, now: bool = False) -> None:
        self.generation += 1
        self.pending = True
        self.refresh_status()
        if self._debounce is not None:
            self._debounce.stop()
        if self.local_errors():
            return  # the engine would only repeat what the form already shows
        generation = self.generation
        self._debounce = self.set_timer(0 if now else DEBOUNCE_S, lambda: self.run_validation(generation))

    @work(thread=True, exclusive=True, group="validate")
    def run_validation(self, generation: int) -> None:
        overrides = self.overrides()
        result = self.validator(Path(self.preset.path), overrides)
        if get_current_worker().is_cancelled:
            return
        self.app.call_from_thread(self.apply_validation, generation, result)

    def apply_validation(self, generation: int, result: Any) -> None:
        if generation != self.generation:
            return  # the form changed since; a newer check is on its way
        self.pending = False
        problems = list(getattr(result, "problems", []) or [])
        self.engine_problems = problems
        self.engine_warnings = list(getattr(result, "warnings", []) or [])
        self.resolved = getattr(result, "config", None)
        for row in self.rows.values():
            row.engine_error = None
        for key, message in problems:
            row = self.rows.get(key)
            if row is not None:
                row.engine_error = (f"{row.engine_error}; " if row.engine_error else "") + message
        for row in self.rows.values():
            row.show_problem()
        self.refresh_status()

    def refresh_status(self) -> None:
        status = self.query_one("#form-status", Static)
        n = self.n_problems
        if n:
            status.update(f"{n} problem{'s' if n != 1 else ''}")
        elif self.pending:
            status.update("checking…")
        else:
            status.update("valid ✓")
        status.set_class(n > 0, "-bad")
        status.set_class(n == 0 and not self.pending, "-ok")
        self.query_one("#start", Button).disabled = bool(n) or self.pending
        lines = [f"{key or 'config'}: {msg}" for key, msg in self.engine_problems if key not in self.rows]
        problems = self.query_one("#form-problems", Static)
        problems.update("\n".join(lines))
        problems.display = bool(lines)
        warnings = self.query_one("#form-warnings", Static)
        warnings.update("\n".join(f"warning: {w}" for w in self.engine_warnings[:4]))
        warnings.display = bool(self.engine_warnings)

    # ---- actions ------------------------------------------------------------------------------

    @on(Button.Pressed, "#start")
    def _start_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_start()

    def action_start(self) -> None:
        if self.query_one("#start", Button).disabled:
            self.app.bell()
            self.notify("Fix the problems first" if self.n_problems else "Still checking the config…",
                        severity="warning")
            return
        self.on_start(self.preset, self.overrides(), self.resolved)

    def action_find(self) -> None:
        self.query_one("#form-filter", Input).focus()

    def action_back(self) -> None:
        """Esc clears the find box first; with edits, it asks before dropping them."""
        from ebft_tui.tui.screens.confirm import ConfirmScreen

        flt = self.query_one("#form-filter", Input)
        if flt.value:
            flt.value = ""
            return
        changed = self.overrides()
        if not changed:
            self.app.pop_screen()
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.app.pop_screen()

        n = len(changed)
        self.app.push_screen(ConfirmScreen(
            f"Drop your {n} change{'s' if n != 1 else ''} ({', '.join(c.split('=')[0] for c in changed[:4])}"
            f"{', …' if n > 4 else ''}) and go back to the presets?", yes="Drop changes", no="Keep editing"), answer)

    def row(self, key: str) -> FieldRow:
        return self.rows[key]

    def config_value(self, dotted: str) -> Any:
        """The value of a key as the run would get it (resolved config when known, else preset)."""
        if self.resolved is not None:
            return get_path(self.resolved, dotted)
        return get_path(self.preset_config, dotted)
