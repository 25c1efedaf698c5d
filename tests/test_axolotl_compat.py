"""Every key an axolotl EBFT config may hold is honoured, mapped, inert or refused, as the table
(ebft_engine/axolotl_keys.yaml) says, and never "unknown" (issue 18)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, get_origin

import pytest
import yaml

from ebft_engine.commands import validate as validate_command
from ebft_engine.compat import CLASSES, KeyRow, ebft_only_keys, explain, key_pattern, load_table, render_markdown
from ebft_engine.config import _LEVELS, _INERT_SCHEMA_KEYS, _submodel, _unwrap, schema_descriptions

REPO = Path(__file__).resolve().parents[1]
TABLE = load_table()
ROWS = list(TABLE.rows.values())

BASE: dict[str, Any] = {
    "base_model": "builtin:smollm2-135m-instruct", "rl": "ebft",
    "datasets": [{"path": "rows.jsonl", "type": "ebft_opencode.transform"}],
    "trl": {"num_generations": 4, "max_completion_length": 64}, "micro_batch_size": 4,
}
"""A valid structured config (the mode most keys are about); each row's sample goes on top."""


def _put(cfg: dict[str, Any], path: str, value: Any) -> None:
    """Set a table path (`trl.beta`, `datasets[].shards`) in a config dict; `[]` is the first entry."""
    node: Any = cfg
    parts = path.split(".")
    for part in parts[:-1]:
        if part.endswith("[]"):
            node = node[part[:-2]][0]
        else:
            node = node.setdefault(part, {})
    current = node.get(parts[-1])
    node[parts[-1]] = _merge(current, value) if isinstance(current, dict) and isinstance(value, dict) \
        else copy.deepcopy(value)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def sample_config(row: KeyRow) -> dict[str, Any]:
    cfg = _merge(BASE, row.with_)
    _put(cfg, row.sample_key(), row.sample)
    return cfg


def validate_json(tmp_path: Path, cfg: dict[str, Any], capsys) -> tuple[int, dict[str, Any]]:
    """`python -m ebft_engine validate CONFIG --json`, in-process (540 subprocesses would take minutes)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    for name in ("rows.jsonl", "held.jsonl"):  # validate reads the data files a config names
        (tmp_path / name).write_text('{"input": "q", "output": "a"}\n')
    capsys.readouterr()
    args = argparse.Namespace(config=str(path), overrides=[], json=True, write_resolved=None, explain=None)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # where the relative paths of BASE and the samples point
    try:
        code = validate_command.run(args)
    finally:
        os.chdir(cwd)
    return code, json.loads(capsys.readouterr().out)


def shown_key(row: KeyRow) -> str:
    """The key as validate names it: `datasets[0].shards`, `fsdp_config.fsdp_offload_params`."""
    return row.sample_key().replace("[]", "[0]")


@pytest.mark.parametrize("row", ROWS, ids=[r.key for r in ROWS])
def test_validate_answers_as_the_table_says(row, tmp_path, capsys):
    code, doc = validate_json(tmp_path, sample_config(row), capsys)
    key = shown_key(row)
    ignored = [w for w in doc["warnings"] if (f"`{key}`" in w or f"`{key}." in w) and "ignored" in w]
    if row.cls == "refused":
        assert code == 2, doc
        assert key in [p["key"] for p in doc["problems"]], doc["problems"]
        return
    assert code == 0, doc["problems"]
    if row.cls == "inert":
        assert len(ignored) >= 1, doc["warnings"]
    else:
        assert not ignored, ignored
    if row.to:
        target: Any = doc["config"]
        for part in row.to.split("."):
            target = target[part]
        applies, expected = row.mapped_value(row.sample)
        assert applies and target == expected, (row.to, target)


def test_a_refused_key_with_the_value_ebft_uses_anyway_is_accepted(tmp_path, capsys):
    cfg = _merge(BASE, {"load_in_4bit": False, "sample_packing": False, "trl": {"beta": 0.0}})
    code, doc = validate_json(tmp_path, cfg, capsys)
    assert code == 0 and not doc["warnings"], doc


def test_a_structured_only_refusal_is_only_a_warning_in_strided_mode(tmp_path, capsys):
    cfg = _merge(BASE, {"ebft": {"mode": "strided"}, "trl": {"beta": 0.04}})
    code, doc = validate_json(tmp_path, cfg, capsys)
    assert code == 0, doc["problems"]
    assert any("`trl.beta`" in w and "strided" in w for w in doc["warnings"])


def test_a_mapped_key_and_its_target_set_apart_is_refused_naming_both(tmp_path, capsys):
    code, doc = validate_json(tmp_path, _merge(BASE, {"bfloat16": True, "bf16": False}), capsys)
    assert code == 2
    (problem,) = doc["problems"]
    assert problem["key"] == "bfloat16" and "`bf16: false`" in problem["message"]


def test_a_typo_still_gets_a_did_you_mean(tmp_path, capsys):
    code, doc = validate_json(tmp_path, _merge(BASE, {"load_in_4bits": True, "trl": {"betta": 0.1}}), capsys)
    assert code == 2
    messages = {p["key"]: p["message"] for p in doc["problems"]}
    assert "Did you mean `load_in_4bit`?" in messages["load_in_4bits"]
    assert "Did you mean `trl.beta`?" in messages["trl.betta"]


# -- the table itself ---------------------------------------------------------------------------


def _schema_has(path: str) -> bool:
    """A key of ebft's schema: a field at its level, or a key of a free-form dict field."""
    parent, _, name = path.rpartition(".")
    model = _LEVELS.get(parent)
    if model is not None and name in model.model_fields:
        return True
    grand, _, field = parent.rpartition(".")
    model = _LEVELS.get(grand)
    if model is None or field not in model.model_fields:
        return False
    ann, _ = _unwrap(model.model_fields[field].annotation)
    return get_origin(ann) is dict or ann is dict


def test_each_row_is_well_formed_and_agrees_with_the_schema():
    assert TABLE.version == "0.18.0" and len(TABLE.commit) == 40
    for row in ROWS:
        assert row.cls in CLASSES, row.key
        if row.cls == "honoured":
            assert _schema_has(row.key), f"{row.key} is honoured but not a key of EbftConfig"
        if row.cls == "mapped":
            assert (row.to and row.to in schema_descriptions()) or _schema_has(row.key), row.key
        if row.cls == "refused":
            assert not _schema_has(row.key), f"{row.key} is refused but the schema would accept it"
            assert row.note, row.key
        if row.cls == "inert" and _schema_has(row.key):
            assert row.key in _INERT_SCHEMA_KEYS, f"{row.key}: an inert schema key nobody warns about"
        if row.is_wildcard:
            assert row.example_key, row.key
        if row.values is not None:
            assert row.to, row.key


def test_ebft_only_keys_are_the_schema_keys_axolotl_lacks():
    ours = ebft_only_keys()
    assert {"vllm.backend", "ebft.sliding_context_window", "eval_max_rows"} <= set(ours)
    assert not set(ours) & set(TABLE.rows)
    assert "save_strategy" not in ours and "trl.temperature" not in ours


def test_the_distributed_rows_are_one_marked_group():
    (group,) = [g for g in TABLE.groups if g.owner]
    assert group.owner == "issue 14"
    for key in ("ddp", "fsdp", "fsdp_config", "fsdp_config.*", "deepspeed", "device_map", "world_size",
                "local_rank", "tensor_parallel_size", "vllm.data_parallel_size"):
        assert key in group.keys, key


# -- explain and the doc ------------------------------------------------------------------------


def test_explain_prints_a_row_in_any_spelling():
    assert key_pattern("datasets.0.shards") == key_pattern("test_datasets[1].shards").replace("test_", "")
    text = explain("datasets.0.shards")
    assert text.startswith("datasets[].shards: refused") and "split slice" in text
    wild = explain("fsdp_config.fsdp_offload_params")
    assert "inert" in wild and "issue 14" in wild and "[row fsdp_config.*]" in wild
    assert "means: bf16" in explain("bfloat16")
    assert explain("vllm.backend", schema_descriptions()).startswith("vllm.backend: an ebft key")
    assert explain("no_such_key") is None


def test_explain_through_both_commands():
    engine = subprocess.run([sys.executable, "-m", "ebft_engine", "validate", "--explain", "save_strategy"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert engine.returncode == 0 and engine.stdout.startswith("save_strategy: honoured"), engine.stderr
    from typer.testing import CliRunner

    from ebft_tui.cli import app

    res = CliRunner().invoke(app, ["validate", "--explain", "trl.beta"])
    assert res.exit_code == 0 and "trl.beta: refused" in res.stdout, res.output
    res = CliRunner().invoke(app, ["validate", "--explain", "save_stratgy"])
    assert res.exit_code == 2 and "Did you mean `save_strategy`" in res.output


def test_the_doc_is_generated_from_the_table():
    doc = (REPO / "docs" / "axolotl-compat.md").read_text(encoding="utf-8")
    assert doc == render_markdown(ebft_only_keys()), "run: python scripts/axolotl_compat.py --write"
    for row in ROWS:
        assert f"| `{row.key}` | {row.cls} |" in doc, row.key


# -- axolotl's cross-key rules, enforced the same way (each message names both keys) ------------


def problems(tmp_path, capsys, **keys) -> dict[str, str]:
    code, doc = validate_json(tmp_path, _merge(BASE, keys), capsys)
    assert code == (2 if doc["problems"] else 0)
    return {p["key"]: p["message"] for p in doc["problems"]}


def test_save_strategy_steps_with_save_steps_validates(tmp_path, capsys):
    code, doc = validate_json(tmp_path, _merge(BASE, {"save_strategy": "steps", "save_steps": 50}), capsys)
    assert code == 0 and doc["config"]["save_steps"] == 50 and doc["config"]["save_strategy"] == "steps"


def test_save_strategy_no_with_save_steps_is_refused_naming_both(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE) + "save_strategy: no\nsave_steps: 50\n")  # unquoted: YAML's false
    args = argparse.Namespace(config=str(path), overrides=[], json=True, write_resolved=None, explain=None)
    capsys.readouterr()
    assert validate_command.run(args) == 2
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert "`save_strategy: no`" in problem["message"] and "`save_steps: 50`" in problem["message"]


def test_a_strategy_without_its_interval_takes_the_transformers_default(tmp_path, capsys):
    code, doc = validate_json(tmp_path, _merge(BASE, {"save_strategy": "steps", "eval_strategy": "steps",
                                                      "logging_steps": 5, "val_set_size": 0.1}), capsys)
    assert code == 0 and doc["config"]["save_steps"] == 500 and doc["config"]["eval_steps"] == 5
    assert any("`save_strategy: steps` without `save_steps`" in w for w in doc["warnings"])


@pytest.mark.parametrize("keys, key, named", [
    ({"eval_strategy": "epoch", "eval_steps": 5, "val_set_size": 0.1}, "eval_strategy", ["eval_steps"]),
    ({"eval_steps": 5}, "eval_steps", ["val_set_size", "test_datasets"]),
    ({"val_set_size": 0.1, "test_datasets": [{"path": "held.jsonl"}]}, "val_set_size", ["test_datasets"]),
    ({"early_stopping_patience": 3}, "early_stopping_patience", ["eval_steps"]),
    ({"saves_per_epoch": 2, "save_steps": 5}, "saves_per_epoch", ["save_steps"]),
    ({"evals_per_epoch": 2, "eval_steps": 5, "val_set_size": 0.1}, "evals_per_epoch", ["eval_steps"]),
    ({"batch_size": 8, "gradient_accumulation_steps": 2}, "batch_size", ["gradient_accumulation_steps"]),
    ({"batch_size": 7}, "batch_size", ["micro_batch_size"]),
    ({"torch_dtype": "float32", "bf16": True}, "torch_dtype", ["bf16"]),
    ({"bf16": True, "fp16": True}, "fp16", ["bf16"]),
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "warmup_ratio", ["warmup_steps"]),
    ({"eval_pass_at_1": True}, "eval_pass_at_1", ["test_datasets"]),
    ({"save_strategy": "best"}, "save_strategy", ["save_steps", "eval_steps"]),
    ({"save_steps": 2.5}, "save_steps", []),
    ({"metric_for_best_model": "bleu"}, "metric_for_best_model", ["eval_loss", "cfm_loss"]),
])
def test_cross_key_rules_name_both_keys(tmp_path, capsys, keys, key, named):
    found = problems(tmp_path, capsys, **keys)
    assert key in found, found
    for other in [key, *named]:
        assert f"`{other}" in found[key], (other, found[key])


def test_lora_keys_without_an_adapter_warn_naming_both(tmp_path, capsys):
    """A warning, not an error: `adapter=null` on the command line turns a LoRA preset into full
    fine-tuning, and the preset's lora_* keys cannot be unset from there."""
    base = {k: v for k, v in BASE.items() if k != "adapter"}
    code, doc = validate_json(tmp_path, _merge(base, {"lora_r": 8}), capsys)
    assert code == 0, doc["problems"]
    assert any("`lora_r`" in w and "`adapter" in w for w in doc["warnings"]), doc["warnings"]


def test_per_epoch_counts_and_batch_size_become_ebft_keys(tmp_path, capsys):
    code, doc = validate_json(tmp_path, _merge(BASE, {"saves_per_epoch": 2, "num_epochs": 2, "evals_per_epoch": 4,
                                                      "val_set_size": 0.1, "batch_size": 16}), capsys)
    assert code == 0, doc["problems"]
    c = doc["config"]
    assert (c["save_steps"], c["eval_steps"], c["saves_per_epoch"], c["evals_per_epoch"]) == (0.25, 0.125, None, None)
    assert (c["gradient_accumulation_steps"], c["batch_size"]) == (4, None)


def test_the_resolved_config_reads_back_as_itself(tmp_path):
    from ebft_engine.config import load_config

    cfg = load_config(_merge(BASE, {"saves_per_epoch": 2, "eval_strategy": "steps", "val_set_size": 0.1,
                                    "batch_size": 8, "bfloat16": True, "vllm": {"port": 8001},
                                    "early_stopping_patience": 2, "metric_for_best_model": "cfm_loss",
                                    "save_strategy": "steps", "tf32": "auto"}))
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()
    assert (cfg.bf16, cfg.trl.vllm_server_port, cfg.best_metric) == (True, 8001, ("eval/cfm_loss", False))
