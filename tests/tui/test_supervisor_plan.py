"""build_plan: validation through the engine, run dir files, placement, env, ports."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from ebft_tui.engine import ConfigInvalid
from ebft_tui.runs.plan import PlanError, build_plan, redact_env

PRESETS = Path(__file__).resolve().parents[2] / "presets"


def preset(name: str) -> Path:
    p = PRESETS / f"{name}.yaml"
    if not p.exists():
        pytest.skip(f"{p.name} is not written yet")
    return p


def test_strided_cpu_plan_writes_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("HF_HOME", "/somewhere")
    monkeypatch.chdir(tmp_path)
    plan = build_plan(preset("smollm2-135m-strided-cpu"), ["max_steps=2"], None, tmp_path / "r")
    assert plan.mode == "strided" and plan.gpus == [] and [p.name for p in plan.processes] == ["trainer"]
    tr = plan.trainer
    assert tr.argv[-3:] == ["ebft_engine", "train", str(tmp_path / "r" / "config.yaml")]
    assert tr.env["CUDA_VISIBLE_DEVICES"] == "" and tr.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert tr.log_path == tmp_path / "r" / "trainer.log" and tr.cwd == tmp_path
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert cfg["max_steps"] == 2 and cfg["output_dir"] == str(tmp_path / "r")  # absolute: runs from anywhere
    assert plan.config["max_steps"] == 2 and plan.whitening is False
    command = (tmp_path / "r" / "command.txt").read_text()
    assert f"ebft run {tmp_path / 'r' / 'config.yaml'}" in command and "train" in command
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert env["inherited"]["HF_TOKEN"] == "***" and env["inherited"]["HF_HOME"] == "/somewhere"
    assert "hf_secret_value" not in (tmp_path / "r" / "env.json").read_text()
    assert env["processes"]["trainer"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_run_dir_defaults_to_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = build_plan(preset("smollm2-135m-strided-cpu"), ["output_dir=./outs/x"], None)
    assert plan.run_dir == tmp_path / "outs" / "x" and (plan.run_dir / "config.yaml").exists()


def test_structured_plan_server_then_trainer_on_chosen_gpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = yaml.safe_load(preset("smollm2-135m-structured-cpu").read_text())
    src["device"] = "auto"  # a GPU preset in spirit: then --gpus decides placement
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(yaml.safe_dump(src))
    plan = build_plan(cfg, [], [3, 5], tmp_path / "r")
    assert [p.name for p in plan.processes] == ["server", "trainer"]
    server, trainer = plan.processes
    assert server.env["CUDA_VISIBLE_DEVICES"] == "3" and trainer.env["CUDA_VISIBLE_DEVICES"] == "5"
    assert plan.gpus == [3, 5]
    port = int(server.argv[server.argv.index("--port") + 1])
    assert server.ready_url == f"http://127.0.0.1:{port}/health"
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["trl"]["vllm_server_port"] == port
    one = build_plan(cfg, [], [2], tmp_path / "r1")
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in one.processes] == ["2", "2"]
    assert any("share GPU 2" in w for w in one.warnings)
    cpu = build_plan(cfg, [], [], tmp_path / "r2")
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in cpu.processes] == ["", ""] and cpu.gpus == []


def test_busy_port_moves_the_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        plan = build_plan(preset("smollm2-135m-structured-cpu"), [f"trl.vllm_server_port={busy}"], None, tmp_path / "r")
    port = int(plan.server.argv[plan.server.argv.index("--port") + 1])
    assert port != busy and any(str(busy) in w for w in plan.warnings)
    assert plan.config["trl"]["vllm_server_port"] == port


def test_cpu_config_ignores_gpus_and_bad_configs_raise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = build_plan(preset("smollm2-135m-strided-cpu"), [], [0], tmp_path / "r")
    assert plan.gpus == [] and any("device: cpu" in w for w in plan.warnings)
    with pytest.raises(ConfigInvalid) as ei:
        build_plan(preset("smollm2-135m-strided-cpu"), ["ebft.stride=0", "max_stepz=1"], None, tmp_path / "bad")
    keys = [k for k, _ in ei.value.problems]
    assert "ebft.stride" in keys and "max_stepz" in keys
    assert not (tmp_path / "bad" / "config.yaml").exists()


def test_redact_env():
    assert redact_env({"WANDB_API_KEY": "x", "HF_TOKEN": "y", "MY_PASSWORD": "z", "HF_HOME": "h", "EMPTY_TOKEN": ""}) == \
        {"WANDB_API_KEY": "***", "HF_TOKEN": "***", "MY_PASSWORD": "***", "HF_HOME": "h", "EMPTY_TOKEN": ""}


def test_unknown_gpu_index_is_an_error_when_nvml_works(tmp_path, monkeypatch):
    from ebft_tui.runs import plan as plan_mod
    from ebft_tui.system.gpus import GpuInfo

    monkeypatch.setattr(plan_mod, "list_gpus", lambda: [GpuInfo(0, "A", 0.0, 0.0, 1.0)])
    with pytest.raises(PlanError, match="no GPU with index 7"):
        plan_mod._choose_gpus("strided", False, [7], [])
