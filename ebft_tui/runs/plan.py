"""Launch plan: a config + a GPU choice -> the processes to start, as data.

`build_plan` validates through the engine, fixes the run directory, writes RUN_DIR/config.yaml
(what actually runs), command.txt and env.json, and returns a `LaunchPlan` whose `ProcessSpec`s
carry argv/env/log paths. The supervisor only executes specs, so tests build plans by hand with
fake programs.

Placement: structured (sync/async) = generation server on the first chosen GPU, trainer on the
second (both on one GPU if only one is chosen); strided = trainer alone on one GPU; CPU (no GPU
chosen or found, or `device: cpu`) = `CUDA_VISIBLE_DEVICES=""`. GPU indices are NVML indices, so
`CUDA_DEVICE_ORDER=PCI_BUS_ID` is always set.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ebft_tui import engine
from ebft_tui.overrides import get_path
from ebft_tui.presets import STRIDED, is_cpu_config, mode_of
from ebft_tui.runs.layout import RunDir
from ebft_tui.runs.lock import RunDirLocked, live_holder
from ebft_tui.system.gpus import list_gpus, nvml_unavailable_reason, pick_free_gpus

DEFAULT_PORT = 8000
DEFAULT_READY_TIMEOUT_S = 600.0
_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)
_RECORDED_PREFIXES = ("CUDA_", "HF_", "EBFT_", "WANDB_", "TORCH", "PYTORCH_", "VLLM_", "OMP_", "NCCL_",
                      "TRANSFORMERS_", "TOKENIZERS_", "HUGGING")


class PlanError(ValueError):
    """A launch that cannot be planned (bad GPU index...). The message says what to do."""


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str]  # set on top of the launcher's environment
    log_path: Path
    ready_url: str | None = None
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    cwd: Path | None = None
    # What the child gets the moment its launcher dies (PR_SET_PDEATHSIG, runs/lifeline.py):
    # SIGKILL, unless it has children of its own to take down first (the server forwards SIGTERM
    # to vLLM's process group).
    death_signal: int = signal.SIGKILL


@dataclass
class LaunchPlan:
    run_dir: Path
    mode: str
    processes: list[ProcessSpec]
    resolved_config_path: Path | None
    gpus: list[int]
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None

    @property
    def layout(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def metrics_path(self) -> Path:
        return self.layout.metrics

    def spec(self, name: str) -> ProcessSpec | None:
        return next((p for p in self.processes if p.name == name), None)

    @property
    def trainer(self) -> ProcessSpec | None:
        return self.spec("trainer")

    @property
    def server(self) -> ProcessSpec | None:
        return self.spec("server")

    @property
    def whitening(self) -> bool:
        return bool(get_path(self.config or {}, "ebft.use_whitening", False))


def check_run_dir_free(run_dir: str | Path) -> None:
    """Raise `RunDirLocked` (naming the holder) when a live launcher supervises `run_dir`."""
    holder = live_holder(run_dir)
    if holder is not None:
        raise RunDirLocked(Path(run_dir), holder)


def has_previous_run(run_dir: str | Path) -> bool:
    """The folder holds an earlier run (its log or checkpoints): a new start resumes it."""
    rd = RunDir(run_dir)
    return rd.metrics.is_file() or (rd.path / "checkpoints").is_dir()


def plan_to_dict(plan: LaunchPlan) -> dict[str, Any]:
    """JSON-able form of a plan (the TUI hands it to its run keeper process)."""
    return {
        "run_dir": str(plan.run_dir), "mode": plan.mode, "gpus": plan.gpus, "warnings": plan.warnings,
        "resolved_config_path": str(plan.resolved_config_path) if plan.resolved_config_path else None,
        "config": plan.config,
        "processes": [{
            "name": p.name, "argv": p.argv, "env": p.env, "log_path": str(p.log_path), "ready_url": p.ready_url,
            "ready_timeout_s": p.ready_timeout_s, "cwd": str(p.cwd) if p.cwd else None,
            "death_signal": int(p.death_signal),
        } for p in plan.processes],
    }


def plan_from_dict(data: dict[str, Any]) -> LaunchPlan:
    procs = [ProcessSpec(name=p["name"], argv=list(p["argv"]), env=dict(p["env"]), log_path=Path(p["log_path"]),
                         ready_url=p.get("ready_url"), ready_timeout_s=float(p.get("ready_timeout_s") or DEFAULT_READY_TIMEOUT_S),
                         cwd=Path(p["cwd"]) if p.get("cwd") else None,
                         death_signal=int(p.get("death_signal") or signal.SIGKILL))
             for p in data["processes"]]
    rc = data.get("resolved_config_path")
    return LaunchPlan(run_dir=Path(data["run_dir"]), mode=str(data["mode"]), processes=procs,
                      resolved_config_path=Path(rc) if rc else None, gpus=list(data.get("gpus") or []),
                      warnings=list(data.get("warnings") or []), config=data.get("config"))


def redact_env(env: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if _SECRET.search(k) and v else v) for k, v in env.items()}


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _choose_gpus(mode: str, cpu: bool, gpus: list[int] | None, warnings: list[str]) -> list[int]:
    need = 1 if mode == STRIDED else 2
    if cpu:
        if gpus:
            warnings.append("the config says device: cpu, so --gpus is ignored")
        return []
    if gpus is not None:
        gpus = list(dict.fromkeys(int(g) for g in gpus))
        if not gpus:
            return []
        known = {g.index for g in list_gpus()}
        if known:
            bad = [g for g in gpus if g not in known]
            if bad:
                raise PlanError(f"--gpus: no GPU with index {bad[0]} (found {sorted(known)}); see `ebft gpus`")
        elif nvml_unavailable_reason():
            warnings.append(f"cannot check --gpus ({nvml_unavailable_reason()}); using them as given")
        if len(gpus) > need:
            warnings.append(f"{mode} mode uses {need} GPU(s); using {gpus[:need]}")
            gpus = gpus[:need]
        if len(gpus) < need:
            warnings.append("server and trainer share GPU %d" % gpus[0])
        return gpus
    found = list_gpus()
    if not found:
        warnings.append(f"no GPU found ({nvml_unavailable_reason() or 'NVML sees none'}): running on the CPU")
        return []
    chosen = pick_free_gpus(need) or [g.index for g in found[:need]]
    if len(chosen) < need:
        warnings.append("server and trainer share GPU %d" % chosen[0])
    return chosen


def _base_env(gpus: list[int], run_dir: Path) -> dict[str, str]:
    return {
        "PYTHONUNBUFFERED": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
        "EBFT_RUN_DIR": str(run_dir),
    }


def build_plan(
    config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    gpus: list[int] | None = None,
    run_dir: str | Path | None = None,
    fresh: bool = False,
) -> LaunchPlan:
    """Validate `config` + overrides through the engine and plan the launch (writes RUN_DIR files).

    `fresh`: start from scratch, deleting the run already in the folder (the engine's
    `--no-resume --overwrite`); otherwise the trainer resumes from the folder's last checkpoint.
    Raises `engine.ConfigInvalid` (with every problem), `PlanError`, or `RunDirLocked` when a live
    launcher holds the run directory (before anything in it is written).
    """
    config = Path(config)
    overrides = list(overrides)
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ebft-plan-") as tmp:
        written = Path(tmp) / "config.yaml"
        res = engine.validate(config, overrides, write_resolved=written)
        res.raise_for_problems(str(config))
        warnings.extend(res.warnings)
        if written.is_file():
            resolved = yaml.safe_load(written.read_text(encoding="utf-8")) or {}
        else:
            resolved = dict(res.config or {})

    mode = mode_of(resolved)
    cpu = is_cpu_config(resolved)
    chosen = _choose_gpus(mode, cpu, gpus, warnings)

    out = run_dir if run_dir is not None else resolved.get("output_dir") or f"outputs/{config.stem}"
    rd = RunDir(Path(out).expanduser().resolve())
    check_run_dir_free(rd.path)
    rd.ensure()
    resolved["output_dir"] = str(rd.path)
    cwd = Path.cwd()

    processes: list[ProcessSpec] = []
    base_env = _base_env(chosen, rd.path)
    if mode != STRIDED:
        trl = resolved.get("trl")
        if not isinstance(trl, dict):
            trl = resolved["trl"] = {}
        port = int(trl.get("vllm_server_port") or DEFAULT_PORT)
        if not port_is_free(port):
            new = free_port()
            warnings.append(f"port {port} is in use: the server will listen on {new} (trl.vllm_server_port)")
            port = new
        trl["vllm_server_port"] = port
        timeout = float(trl.get("vllm_server_timeout") or DEFAULT_READY_TIMEOUT_S)
        # The run's server token (docs/security.md): to server and trainer through their
        # environments only; env.json redacts it, command.txt and the screens never show env.
        token = secrets.token_urlsafe(32)
        server_env = dict(base_env, CUDA_VISIBLE_DEVICES=str(chosen[0]) if chosen else "",
                          EBFT_SERVER_TOKEN=token)
        processes.append(ProcessSpec(
            name="server",
            argv=engine.engine_argv("serve", str(rd.config), "--port", str(port)),
            env=server_env,
            log_path=rd.server_log,
            ready_url=f"http://127.0.0.1:{port}/health",
            ready_timeout_s=timeout,
            cwd=cwd,
            death_signal=signal.SIGTERM,
        ))
        trainer_gpu = chosen[1] if len(chosen) > 1 else (chosen[0] if chosen else None)
        trainer_env = dict(base_env, CUDA_VISIBLE_DEVICES="" if trainer_gpu is None else str(trainer_gpu),
                           # the trainer's client errors quote the end of the server's log
                           EBFT_SERVER_LOG=str(rd.server_log), EBFT_SERVER_TOKEN=token)
    else:
        trainer_env = dict(base_env)
    processes.append(ProcessSpec(
        name="trainer",
        argv=engine.engine_argv("train", str(rd.config), *(["--no-resume", "--overwrite"] if fresh else [])),
        env=trainer_env,
        log_path=rd.trainer_log,
        cwd=cwd,
    ))

    rd.config.write_text(
        f"# resolved by ebft from {config} {' '.join(overrides)}\n".rstrip() + "\n"
        + yaml.safe_dump(resolved, sort_keys=False),
        encoding="utf-8",
    )
    plan = LaunchPlan(run_dir=rd.path, mode=mode, processes=processes, resolved_config_path=rd.config,
                      gpus=chosen, warnings=warnings, config=resolved)
    write_plan_files(plan)
    return plan


def write_plan_files(plan: LaunchPlan, launcher_argv: list[str] | None = None) -> None:
    """command.txt (how to reproduce, each child's command line) and env.json (redacted)."""
    rd = plan.layout.ensure()
    argv = launcher_argv if launcher_argv is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]
    lines = [
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  mode={plan.mode}  gpus={plan.gpus or 'cpu'}",
        f"# reproduce: ebft run {shlex.quote(str(plan.resolved_config_path or rd.config))}",
        f"# launcher: {shlex.join(argv)}",
    ]
    for p in plan.processes:
        env = [f"{k}={shlex.quote(v)}" for k, v in redact_env(p.env).items() if k.startswith("CUDA_")]
        cmd = " ".join([*env, shlex.join(p.argv)])
        lines.append(f"{p.name}: cd {shlex.quote(str(p.cwd or Path.cwd()))} && {cmd}")
    rd.command.write_text("\n".join(lines) + "\n", encoding="utf-8")
    inherited = {k: v for k, v in os.environ.items() if k.startswith(_RECORDED_PREFIXES)}
    data = {
        "inherited": redact_env(dict(sorted(inherited.items()))),
        "processes": {p.name: redact_env(p.env) for p in plan.processes},
        "python": sys.executable,
        "cwd": str(Path.cwd()),
    }
    rd.env.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

