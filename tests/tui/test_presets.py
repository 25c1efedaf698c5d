"""Preset discovery: metadata for `ebft ls`, resolution order, helpful not-found errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebft_tui.presets import (
    PACKAGE_PRESETS_DIR, PresetNotFound, list_presets, preset_info, resolve_preset,
)

REPO_PRESETS = Path(__file__).resolve().parents[2] / "presets"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_packaged_presets_are_the_repo_folder():
    assert PACKAGE_PRESETS_DIR == REPO_PRESETS


def test_metadata_from_header_and_yaml(tmp_path):
    p = write(tmp_path / "x-async.yaml", "# description: two GPUs, async\n# gpus: 2\n\n"
              "base_model: Qwen/Qwen3-4B\nebft:\n  mode: structured\ntrl:\n  async_prefetch: true\n")
    info = preset_info(p)
    assert (info.name, info.mode, info.model, info.gpus, info.description) == \
        ("x-async", "async", "Qwen/Qwen3-4B", 2, "two GPUs, async")
    assert info.device == "2 GPUs"
    bare = preset_info(write(tmp_path / "bare-cpu.yaml", "base_model: m\nebft:\n  mode: strided\n"))
    assert (bare.mode, bare.gpus, bare.device, bare.description) == ("strided", 0, "cpu", "")
    assert preset_info(write(tmp_path / "s.yml", "base_model: m\n")).gpus == 2  # structured default
    assert preset_info(write(tmp_path / "broken.yaml", "a: [\n")).model == "?"


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = list_presets()
    assert shipped, "the repo ships presets"
    name = shipped[0].name
    assert resolve_preset(name) == REPO_PRESETS / f"{name}.yaml"
    assert resolve_preset(f"{name}.yaml") == REPO_PRESETS / f"{name}.yaml"
    local = write(tmp_path / "presets" / f"{name}.yaml", "# description: mine\nbase_model: local\n")
    assert resolve_preset(name) == local  # ./presets shadows the packaged one
    assert next(p for p in list_presets() if p.name == name).model == "local"
    explicit = write(tmp_path / name, "base_model: file\n")  # an existing path wins over names
    assert resolve_preset(name) == explicit
    elsewhere = write(tmp_path / "dir" / "c.yaml", "base_model: m\n")
    assert resolve_preset(str(elsewhere)) == elsewhere


def test_not_found_lists_close_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "presets" / "smollm2-strided-cpu.yaml", "base_model: m\n")
    with pytest.raises(PresetNotFound) as ei:
        resolve_preset("smollm2-strided-cpuu")
    assert "smollm2-strided-cpu" in ei.value.close
    assert "ebft ls" in str(ei.value)
    with pytest.raises(PresetNotFound):
        resolve_preset("some/dir/missing.yaml")


def test_the_demo_preset_is_a_cpu_strided_preset():
    info = next((p for p in list_presets() if p.name == "smollm2-135m-strided-cpu"), None)
    if info is None:
        pytest.skip("presets/smollm2-135m-strided-cpu.yaml is not written yet")
    assert info.mode == "strided" and info.gpus == 0 and info.description
