"""Presets: every file validates, carries the header `ebft ls` reads, and matches the spec's Examples table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ebft_engine.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
HEADER = re.compile(r"^#\s*([a-z_]+)\s*:\s*(.*?)\s*$")

# The spec's Examples table: file -> (hub id, mode, async).
EXAMPLES = {
    "llama-1b-ebft-strided-structured": ("meta-llama/Llama-3.2-1B", "strided", False),
    "qwen3-4b-ebft-structured": ("Qwen/Qwen3-4B", "structured", False),
    "qwen3-4b-ebft-structured-async": ("Qwen/Qwen3-4B", "structured", True),
    "qwen3-8b-ebft-structured": ("Qwen/Qwen3-8B", "structured", False),
    "qwen35-4b-ebft-structured": ("Qwen/Qwen3.5-4B", "structured", False),
    "qwen35-4b-ebft-structured-async": ("Qwen/Qwen3.5-4B", "structured", True),
    "qwen35-9b-ebft-structured": ("Qwen/Qwen3.5-9B", "structured", False),
}
CPU = ["smollm2-135m-strided-cpu", "smollm2-135m-structured-cpu", "smollm2-135m-structured-async-cpu"]
# <|im_end|>, <|endoftext|> of each tokenizer family.
STOP_IDS = {"Qwen/Qwen3-": {151645, 151643}, "Qwen/Qwen3.5-": {248046, 248044}}


def header(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = HEADER.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def test_the_examples_table_and_cpu_presets_are_all_there():
    assert {p.stem for p in PRESETS} >= set(EXAMPLES) | set(CPU)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_and_round_trips(path):
    cfg = load_config(path)
    assert cfg.warnings == [], cfg.warnings
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_header(path):
    meta = header(path)
    assert meta.get("description"), "a preset starts with `# description: ...`"
    cfg = load_config(path)
    expected = 0 if cfg.device == "cpu" else (1 if cfg.mode == "strided" else 2)
    assert int(meta["gpus"]) == expected


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_match_the_spec_table(name):
    model, mode, is_async = EXAMPLES[name]
    cfg = load_config(ROOT / "presets" / f"{name}.yaml")
    assert (cfg.base_model, cfg.mode, cfg.is_async) == (model, mode, is_async)
    if mode == "structured":
        family = "Qwen/Qwen3.5-" if model.startswith("Qwen/Qwen3.5-") else "Qwen/Qwen3-"
        assert set(cfg.trl.generation_kwargs.stop_token_ids) == STOP_IDS[family]
        assert cfg.trl.chat_template_kwargs == {"enable_thinking": False}
        assert cfg.trl.num_generations == 4 and cfg.trl.max_completion_length == 256
        assert cfg.adapter == "lora" and cfg.trl.vllm_lora_sync
        assert cfg.trl.vllm_server_host is None  # loopback (decisions.md §12)


def test_strided_preset_is_the_spec_example():
    cfg = load_config(ROOT / "presets" / "llama-1b-ebft-strided-structured.yaml")
    e = cfg.ebft
    assert (e.stride, e.context_length, e.generate_max_len, e.n_samples_per_prompt) == (8, 8, 8, 4)
    assert (e.temperature, e.use_whitening, e.ce_coef, e.min_completion_prefix) == (0.6, True, 0.03, 8)
    assert cfg.flex_attention and cfg.gradient_checkpointing_kwargs.use_reentrant
    assert (cfg.sequence_len, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (2048, 1, 2)
    assert cfg.datasets[0].type == "ebft_strided_structured.transform"


def test_cpu_presets_are_short_and_offline():
    strided, sync, async_ = (load_config(ROOT / "presets" / f"{n}.yaml") for n in CPU)
    for cfg in (strided, sync, async_):
        assert cfg.device == "cpu" and cfg.base_model == "builtin:smollm2-135m-instruct"
        assert cfg.datasets[0].path == "builtin:humaneval" and cfg.datasets[0].split == "train"
        assert cfg.test_datasets and cfg.test_datasets[0].split == "test"
        assert cfg.adapter == "lora" and cfg.max_steps <= 10
    assert strided.mode == "strided" and strided.sequence_len <= 384 and not strided.flex_attention
    assert strided.datasets[0].type == "ebft_strided_structured.transform"
    for cfg in (sync, async_):
        assert cfg.vllm.backend == "hf" and cfg.trl.num_generations == 4 and cfg.micro_batch_size == 4
        assert cfg.trl.vllm_lora_sync and cfg.datasets[0].type == "ebft_opencode.transform"
    assert not sync.is_async and sync.trl.vllm_sync_interval == 1
    assert async_.is_async and async_.trl.vllm_sync_interval == 2


@pytest.mark.parametrize("name", ["smollm2-135m-strided-cpu", "qwen35-4b-ebft-structured-async"])
def test_validate_command_accepts_presets(name):
    proc = subprocess.run([sys.executable, "-m", "ebft_engine", "validate", f"presets/{name}.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["base_model"] == load_config(ROOT / "presets" / f"{name}.yaml").base_model
    assert "ok:" in proc.stderr
