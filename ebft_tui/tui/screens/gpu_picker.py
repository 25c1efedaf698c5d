"""GPU picker: which GPUs the run gets, with their current utilisation and memory (NVML).

Dismisses with the chosen NVML indices (`[]` = a CPU run) or None when cancelled. The count is
checked against the mode: structured runs need 2 (server on one, trainer on the other), strided
runs 1. GPUs that look free (low utilisation and memory) are pre-selected, nvisel-style. With no
GPU (no driver, no NVML: our CI) the screen says the run will use the CPU.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, SelectionList, Static
from textual.widgets.selection_list import Selection

from ebft_tui.overrides import get_path

FREE_UTIL_PERCENT = 10.0
FREE_MEM_FRACTION = 0.10


def gpus_needed(mode: str | None, preset_gpus: int | None = None) -> int:
    """GPUs a run of this mode uses: 0 for a CPU preset, 1 strided, 2 structured/async."""
    if preset_gpus is not None and preset_gpus <= 0:
        return 0
    return 1 if (mode or "").startswith("strided") else 2


def cpu_fallback_warning(config: dict[str, Any] | None, mode: str | None, preset_gpus: int | None) -> str | None:
    """What happens when a preset made for GPUs (or a vLLM server) is launched on a machine
    without any; None when the preset is meant for the CPU."""
    if not preset_gpus:
        return None  # a CPU preset
    cfg = config or {}
    structured = not (mode or "").startswith("strided")
    vllm = structured and str(get_path(cfg, "vllm.backend", "vllm") or "vllm") == "vllm" \
        and get_path(cfg, "trl.use_vllm", True) is not False
    model = get_path(cfg, "base_model", None) or "the model"
    lines = [f"This preset is made for {preset_gpus} GPU(s), and this machine has none."]
    if vllm:
        lines.append("It generates with a vLLM server, which needs a GPU: the server will fail to start "
                     "(use vllm.backend: hf to generate with transformers on the CPU).")
    lines.append(f"Training {model} on the CPU is very slow (a step can take many minutes) and may run "
                 "out of memory. For a try-out, pick a *-cpu preset.")
    return " ".join(lines)


def looks_free(gpu: Any) -> bool:
    util = getattr(gpu, "util_percent", None)
    used, total = getattr(gpu, "mem_used_mb", None), getattr(gpu, "mem_total_mb", None)
    if util is not None and util > FREE_UTIL_PERCENT:
        return False
    if used is not None and total:
        return used / total <= FREE_MEM_FRACTION
    return True


def gpu_label(gpu: Any) -> str:
    util = getattr(gpu, "util_percent", None)
    used, total = getattr(gpu, "mem_used_mb", None), getattr(gpu, "mem_total_mb", None)
    util_text = f"{util:3.0f}% util" if util is not None else " n/a util"
    mem_text = (f"{used / 1024:5.1f}/{total / 1024:.0f} GiB" if used is not None and total
                else "mem n/a")
    return f"GPU {gpu.index}  {gpu.name:<28.28}  {util_text}  {mem_text}"


class GpuPickerScreen(ModalScreen[list[int] | None]):
    DEFAULT_CSS = """
    GpuPickerScreen { align: center middle; }
    GpuPickerScreen > Vertical {
        width: 96; height: auto; max-height: 80%; border: thick $primary; background: $surface;
        padding: 1 2;
    }
    GpuPickerScreen SelectionList { height: auto; max-height: 12; margin: 1 0; }
    GpuPickerScreen #gpu-none { color: $warning; text-style: bold; margin: 1 0; }
    GpuPickerScreen #gpu-none.-danger { color: $error; }
    GpuPickerScreen #gpu-check { height: auto; margin-bottom: 1; }
    GpuPickerScreen #gpu-check.-bad { color: $error; }
    GpuPickerScreen #gpu-check.-ok { color: $success; }
    GpuPickerScreen Horizontal { height: auto; align-horizontal: right; }
    GpuPickerScreen Button { margin-left: 2; }
    """

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "launch", "Launch", priority=True),
    ]

    def __init__(self, mode: str | None, needed: int,
                 list_gpus: Callable[[], Sequence[Any]], config: dict[str, Any] | None = None,
                 preset_gpus: int | None = None) -> None:
        super().__init__()
        self.mode = mode or "?"
        self.needed = needed
        self.list_gpus = list_gpus
        self.config = config
        self.preset_gpus = preset_gpus if preset_gpus is not None else needed
        self.gpus: list[Any] | None = None
        self.warning: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"[b]Choose GPUs[/b] for this {self.mode} run", id="gpu-title")
            yield Static("looking for GPUs…", id="gpu-none")
            yield SelectionList[int](id="gpu-list")
            yield Static("", id="gpu-check")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Launch ▶", id="launch", variant="success", disabled=True)

    def on_mount(self) -> None:
        self.query_one("#gpu-list").display = False
        self.load_gpus()

    @work(thread=True, exclusive=True)
    def load_gpus(self) -> None:
        try:
            gpus = list(self.list_gpus())
        except Exception as exc:  # NVML surprises must not take the app down
            gpus = []
            self.app.call_from_thread(self.notify, f"GPU query failed: {exc}", severity="warning")
        self.app.call_from_thread(self.show_gpus, gpus)

    def show_gpus(self, gpus: list[Any]) -> None:
        self.gpus = gpus
        none = self.query_one("#gpu-none", Static)
        selection = self.query_one("#gpu-list", SelectionList)
        if self.needed == 0:
            none.update("This preset runs on the CPU: no GPU is used.")
            gpus = []
        elif not gpus:
            self.warning = cpu_fallback_warning(self.config, self.mode, self.preset_gpus)
            none.update("No GPU found (no NVIDIA driver / NVML): this run will use the CPU."
                        + (f"\n\n{self.warning}" if self.warning else ""))
            none.set_class(self.warning is not None, "-danger")
        if not gpus:
            none.display = True
            self.query_one("#gpu-check", Static).update("")
            launch = self.query_one("#launch", Button)
            launch.disabled = False
            launch.label = "Launch on CPU anyway ▶" if self.warning else "Launch on CPU ▶"
            launch.variant = "error" if self.warning else "success"
            (self.query_one("#cancel", Button) if self.warning else launch).focus()
            return
        none.display = False
        selection.display = True
        free = [g.index for g in gpus if looks_free(g)][: self.needed]
        selection.add_options([Selection(gpu_label(g), g.index, g.index in free) for g in gpus])
        selection.focus()
        self.check()

    @property
    def chosen(self) -> list[int]:
        if not self.gpus or self.needed == 0:
            return []
        return sorted(self.query_one("#gpu-list", SelectionList).selected)

    def check(self) -> bool:
        label = self.query_one("#gpu-check", Static)
        if self.gpus is None:
            return False
        if not self.gpus or self.needed == 0:
            return True
        n = len(self.chosen)
        role = "server + trainer" if self.needed == 2 else "trainer"
        ok = n == self.needed
        if ok:
            label.update(f"{n} selected: GPU {', '.join(map(str, self.chosen))} ({role}) ✓")
        else:
            label.update(f"a {self.mode} run needs {self.needed} GPU{'s' if self.needed > 1 else ''} "
                         f"({role}); {n} selected")
        label.set_class(not ok, "-bad")
        label.set_class(ok, "-ok")
        self.query_one("#launch", Button).disabled = not ok
        return ok

    @on(SelectionList.SelectedChanged)
    def _selected_changed(self) -> None:
        self.check()

    @on(Button.Pressed, "#launch")
    def _launch_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_launch()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None)

    def action_launch(self) -> None:
        if self.query_one("#launch", Button).disabled:
            self.app.bell()
            return
        self.dismiss(self.chosen)

    def action_cancel(self) -> None:
        self.dismiss(None)
