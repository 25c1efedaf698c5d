"""Preset discovery and resolution: `ebft ls`, `ebft cat`, `ebft cp` and the TUI's preset picker.

A preset is a YAML file in a `presets/` folder that begins with comment lines
`# description: ...` and `# gpus: N`. Resolution order for a name or path (torchtune's `tune run`
idea): an existing file path > `./presets/NAME.yaml` > the presets folder of the ebft checkout
(next to the `ebft_tui` package).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PACKAGE_PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
_SUFFIXES = (".yaml", ".yml")
_HEADER = re.compile(r"^#\s*([A-Za-z_]+)\s*:\s*(.*?)\s*$")

# Modes as shown to users: the engine's `ebft.mode` plus `trl.async_prefetch`.
STRIDED, STRUCTURED, ASYNC = "strided", "structured", "async"


class PresetNotFound(LookupError):
    def __init__(self, name: str, close: list[str], searched: list[Path]):
        self.name = name
        self.close = close
        self.searched = searched
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        where = ", ".join(str(p) for p in searched) or "(no presets folder)"
        super().__init__(f"no preset or file named {name!r} (looked in {where}).{hint} Try `ebft ls`.")


@dataclass
class PresetInfo:
    name: str
    path: Path
    mode: str
    model: str
    gpus: int
    description: str

    @property
    def device(self) -> str:
        """`cpu`, `1 GPU`, `2 GPUs`."""
        if self.gpus <= 0:
            return "cpu"
        return f"{self.gpus} GPU" + ("s" if self.gpus > 1 else "")


def search_dirs() -> list[Path]:
    dirs = []
    for d in (Path.cwd() / "presets", PACKAGE_PRESETS_DIR):
        if d.is_dir() and all(d.resolve() != x.resolve() for x in dirs):
            dirs.append(d)
    return dirs


def mode_of(config: dict[str, Any]) -> str:
    ebft = config.get("ebft") or {}
    trl = config.get("trl") or {}
    if str(ebft.get("mode") or STRUCTURED) == STRIDED:
        return STRIDED
    return ASYNC if trl.get("async_prefetch") else STRUCTURED


def is_cpu_config(config: dict[str, Any], name: str = "") -> bool:
    return str(config.get("device") or "").lower() == "cpu" or name.endswith("-cpu")


def default_gpus(mode: str, cpu: bool) -> int:
    if cpu:
        return 0
    return 1 if mode == STRIDED else 2


def read_header(path: Path) -> dict[str, str]:
    """The leading `# key: value` comment lines of a preset."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                if not line.startswith("#"):
                    break
                m = _HEADER.match(line.strip())
                if m:
                    out.setdefault(m.group(1).lower(), m.group(2))
    except OSError:
        pass
    return out


def preset_info(path: Path) -> PresetInfo:
    path = Path(path)
    header = read_header(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    name = path.stem
    mode = mode_of(config)
    cpu = is_cpu_config(config, name)
    try:
        gpus = int(header["gpus"])
    except (KeyError, ValueError):
        gpus = default_gpus(mode, cpu)
    return PresetInfo(
        name=name,
        path=path,
        mode=mode,
        model=str(config.get("base_model") or "?"),
        gpus=gpus,
        description=header.get("description", ""),
    )


def _preset_files() -> list[Path]:
    seen: set[str] = set()
    files: list[Path] = []
    for d in search_dirs():
        for p in sorted(d.iterdir()):
            if p.suffix in _SUFFIXES and p.is_file() and p.stem not in seen:
                seen.add(p.stem)
                files.append(p)
    return files


def list_presets() -> list[PresetInfo]:
    """Every preset, `./presets` first (it shadows a packaged preset of the same name), by name."""
    return sorted((preset_info(p) for p in _preset_files()), key=lambda i: i.name)


def preset_names() -> list[str]:
    return [p.stem for p in _preset_files()]


def resolve_preset(name_or_path: str) -> Path:
    """An existing file > `./presets/NAME.yaml` > the packaged presets folder."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    dirs = search_dirs()
    looks_like_name = candidate.parent == Path(".") and not candidate.name.startswith(".")
    if looks_like_name:
        stem = candidate.stem if candidate.suffix in _SUFFIXES else candidate.name
        for d in dirs:
            for suffix in _SUFFIXES:
                p = d / f"{stem}{suffix}"
                if p.is_file():
                    return p
    close = difflib.get_close_matches(candidate.stem, preset_names(), n=3, cutoff=0.5)
    raise PresetNotFound(name_or_path, close, dirs)


def complete_preset(incomplete: str) -> list[str]:
    """Shell completion for PRESET arguments."""
    return [n for n in preset_names() if n.startswith(incomplete)]
