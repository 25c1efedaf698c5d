"""Everything checkable without the model is checked before it loads (issue 12 §3): `validate`
and `train` stop with exit 2 naming the key, the file, the line and what to do; a run whose data
no step can train stops before its first step instead of logging NaN to the end."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from ebft_engine.config import load_config
from ebft_engine.metrics import read_records
from ebft_engine.train import train
from tiny_models import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, **over) -> Path:
    """A strided config on the offline model and a good local JSONL file, with `over` applied."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n')
    raw = {"base_model": "builtin:smollm2-135m-instruct", "rl": "ebft", "device": "cpu",
           "ebft": {"mode": "strided"}, "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
           "output_dir": str(tmp_path / "run"), "max_steps": 1}
    raw.update(over)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def engine(command: str, path: Path, *args: str, cwd: Path | None = None, **env: str):
    return subprocess.run([sys.executable, "-m", "ebft_engine", command, str(path), *args],
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def refused(tmp_path: Path, key: str, *words: str, cwd: Path | None = None, **over) -> str:
    """`validate` and `train` both exit 2 naming `key` and `words`; train loads nothing."""
    path = config(tmp_path, **over)
    for command in ("validate", "train"):
        done = engine(command, path, cwd=cwd, CUDA_VISIBLE_DEVICES="")
        assert done.returncode == 2, (command, done.stderr)
        assert key in done.stderr and "Traceback" not in done.stderr, done.stderr
        for word in words:
            assert word in done.stderr, (command, word, done.stderr)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the run began
    return done.stderr


def test_a_dataset_file_that_does_not_exist(tmp_path):
    done = engine("validate", config(tmp_path))  # the same config with its file: fine
    assert done.returncode == 0, done.stderr
    refused(tmp_path, "datasets[0].path", "no.jsonl", "no such file",
            datasets=[{"path": str(tmp_path / "no.jsonl")}])
    refused(tmp_path, "datasets[0].path", "missing/rows.parquet", "relative to",
            datasets=[{"path": "missing/rows.parquet"}])


def test_a_broken_json_line_is_named_by_its_line_number(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n')
    refused(tmp_path, "datasets[0].path", str(bad), "line 4", "not valid JSON",
            datasets=[{"path": str(bad)}])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "a"}\n["not", "an", "object"]\n')
    refused(tmp_path, "test_datasets[0].path", "train.jsonl", "line 2", "not an object",
            test_datasets=[{"path": str(folder)}])
    doc = tmp_path / "doc.json"
    doc.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    refused(tmp_path, "datasets[0].path", "line 4", datasets=[{"path": str(doc)}])
    parquet = tmp_path / "cut.parquet"
    parquet.write_bytes(b"PAR1" + b"\0" * 64)  # a copy cut short: no footer
    refused(tmp_path, "datasets[0].path", "not a complete Parquet file", datasets=[{"path": str(parquet)}])


def test_output_dir_that_is_an_existing_file(tmp_path):
    (tmp_path / "taken").write_text("a file")
    refused(tmp_path, "output_dir", "existing file", output_dir=str(tmp_path / "taken"))
    refused(tmp_path, "output_dir", "is a file", output_dir=str(tmp_path / "taken" / "run"))


def test_device_cuda_without_cuda(tmp_path):
    refused(tmp_path, "device", "device: cuda", "device: auto", device="cuda")


def test_a_custom_transform_that_raises_at_import_is_named(tmp_path):
    (tmp_path / "my_rows.py").write_text(textwrap.dedent("""\
        import json
        TABLE = json.loads("{not json")
        def transform(cfg, **kwargs):
            return (lambda row, tokenizer=None: row), {}
        """))
    stderr = refused(tmp_path, "datasets[0].type", "my_rows", "my_rows.py line 2", "JSONDecodeError",
                     cwd=tmp_path, datasets=[{"path": str(tmp_path / "data.jsonl"), "type": "my_rows.transform"}])
    assert "python -c 'import my_rows'" in stderr
    (tmp_path / "my_rows.py").write_text("def transform(cfg, **kwargs):\n    raise KeyError('sequence')\n")
    refused(tmp_path, "datasets[0].type", "transform(cfg) raised", "KeyError", cwd=tmp_path,
            datasets=[{"path": str(tmp_path / "data.jsonl"), "type": "my_rows.transform"}])


def test_a_local_base_model_that_does_not_exist(tmp_path):
    refused(tmp_path, "base_model", "no such folder", "owner/name", base_model=str(tmp_path / "models" / "mine"))
    refused(tmp_path, "base_model", "no such folder", base_model="outputs/run/final/model")  # not a hub id
    refused(tmp_path, "base_model", "no such GGUF file", base_model="weights.gguf")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    refused(tmp_path, "base_model", "LoRA adapter folder", base_model=str(adapter))


def test_hub_ids_and_local_paths_are_told_apart():
    from ebft_engine.sources import is_local, looks_like_hub_id

    for hub in ("gpt2", "Qwen/Qwen3-4B", "meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert looks_like_hub_id(hub) and not is_local(hub), hub
    for path in ("./model", "/abs/model", "~/m", "a/b/c", "my model", "org/", "-bad", "a--b/c", "x/y.",
                 "C:\\models\\m", "runs/../m"):
        assert is_local(path), path
    assert is_local("rows.jsonl", (".jsonl",)) and not is_local("builtin:humaneval")


def test_strided_rows_too_short_for_one_block_stop_at_the_first_step(tmp_path):
    cfg = load_config({"base_model": "tiny", "rl": "ebft", "device": "cpu", "output_dir": str(tmp_path / "run"),
                       "ebft": {"mode": "strided", "context_length": 8, "generate_max_len": 8, "stride": 8,
                                "n_samples_per_prompt": 2, "use_whitening": False},
                       "datasets": [{"path": "rows.jsonl"}], "max_steps": 3, "micro_batch_size": 2,
                       "sequence_len": 64})
    rows = [{"input_ids": list(range(1, 1 + n))} for n in (5, 9, 12, 15)]  # 16 tokens make a block
    code = train(cfg, build_model=lambda c: (make_tiny_llama(), None, torch.device("cpu"), torch.float32),
                 load_data=lambda c, tok: rows)
    assert code == 2
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    assert not [r for r in records if r["event"] == "metrics"]
    (error,) = [r for r in records if r["event"] == "error"]
    assert "none of the 4 training rows" in error["message"] and "ebft.generate_max_len = 8" in error["message"]
    assert "the longest row has 15" in error["message"]

    rows.append({"input_ids": list(range(1, 41))})  # one row that fits: train, with a warning
    code = train(cfg, build_model=lambda c: (make_tiny_llama(), None, torch.device("cpu"), torch.float32),
                 load_data=lambda c, tok: rows, resume=False, overwrite=True)
    assert code == 0
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    assert any("4 of the 5 training rows have no room" in r.get("message", "") for r in records)
