"""Atomic checkpoints in `RUN_DIR/checkpoints/step-NNNNNN/` and their restore.

A checkpoint is built in `checkpoints/.tmp-*`, fsynced, then renamed into place, so a kill at any
moment leaves either the previous complete checkpoints or the new one, never half of one; readers
ignore `.tmp-*` folders. Contents:

- the weights: the LoRA adapter via peft `save_pretrained` (reloadable with
  `PeftModel.from_pretrained`), or the full model's `save_pretrained` without an adapter;
- `trainer_state.pt`: step, optimizer, scheduler, every RNG (python, numpy, torch, cuda) and the
  data position, loadable with `torch.load(weights_only=True)`;
- `config.yaml`: the resolved config that produced it (resume refuses a different one);
- `manifest.json`, written last: every other file's size and sha256. A resume verifies the newest
  checkpoint against it and, when a file is missing, truncated or changed (a disk that lied about
  an fsync, a copy cut short, a bad sector), names it and falls back to the newest one that
  verifies (`find_resumable`).

Folders `.tmp-*` left by saves that were killed are removed when a run starts
(`clean_leftovers`) and after every save.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HASH_CHUNK = 8 << 20


# ---------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> dict[str, Any]:
    """Every RNG the step may draw from, as tensors and plain Python values."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------
# Save


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)  # releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """`manifest.json`: the size and sha256 of every other file of `folder` (written last)."""
    files = _files(folder)
    with ThreadPoolExecutor(max_workers=min(4, len(files) or 1)) as pool:
        hashes = list(pool.map(_sha256, files))
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": h}
               for p, h in zip(files, hashes)}
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": entries}, indent=1) + "\n",
                                   encoding="utf-8")


def manifest_problem(folder: Path) -> str | None:
    """What differs between `folder` and its manifest (None: every file has its size and hash)."""
    try:
        entries = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__})"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']} (truncated?)"
    with ThreadPoolExecutor(max_workers=min(4, len(entries) or 1)) as pool:
        hashes = dict(zip(entries, pool.map(lambda n: _sha256(folder / n), entries)))
    for name, entry in entries.items():
        if hashes[name] != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest (changed or corrupt)"
    return None


def atomic_dir(final: Path, fill, manifest: bool = False) -> Path:
    """Build `final` by `fill(tmp)` in a sibling `.tmp-*` folder (with `manifest.json` last when
    asked), fsync it and rename it in place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    if manifest:
        write_manifest(tmp)
    _fsync_tree(tmp)
    if final.exists():  # os.replace cannot replace a non-empty folder: move the old one aside
        old = final.parent / f".tmp-old-{final.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)
    return final


def save_checkpoint(run_dir: str | os.PathLike[str], step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, rng_state: dict[str, Any],
                    data_state: dict[str, Any], config_yaml: str,
                    save_total_limit: int | None = None) -> Path:
    """Write `checkpoints/step-{step:06d}` atomically, prune to `save_total_limit`; returns its path."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)  # a peft model saves its adapter only, any other its full weights
        torch.save({"step": step, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state, "data": data_state}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")

    path = atomic_dir(ckpt_dir / f"step-{step:06d}", fill, manifest=True)
    _prune(ckpt_dir, save_total_limit)
    return path


def clean_leftovers(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the `.tmp-*` folders of killed saves (checkpoints, the final adapter, weight-sync
    folders) from a run dir no other trainer writes to; returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINTS, run_dir / "lora-sync", run_dir / "weight-sync"):
        for leftover in folder.glob(".tmp-*") if folder.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _prune(ckpt_dir: Path, save_total_limit: int | None) -> None:
    for leftover in ckpt_dir.glob(".tmp-*"):  # from a save that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    if save_total_limit and save_total_limit > 0:
        for old in list_checkpoints(ckpt_dir.parent)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints, oldest first (`.tmp-*` and folders without a state file are ignored)."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def find_resumable(run_dir: str | os.PathLike[str]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match its manifest, and one warning for each newer
    `step-*` folder skipped, naming it and what is wrong; a skipped folder is renamed
    `damaged-step-*` (kept for a look, never verified or pruned again). A checkpoint saved before
    manifests existed (no manifest, but a state file) is used unverified, with a warning."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    steps = sorted((int(m.group(1)), p) for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else ())
                   if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    warnings = []
    for _, path in reversed(steps):
        name = f"{CHECKPOINTS}/{path.name}"
        if not (path / MANIFEST).exists() and (path / STATE_FILE).is_file():
            warnings.append(f"{name} has no {MANIFEST} (saved by an older ebft): resuming from it "
                            "without verifying its files")
            return path, warnings
        problem = manifest_problem(path)
        if problem is None:
            return path, warnings
        aside = _set_aside(path)
        warnings.append(f"{name} is damaged: {problem}. Skipped it and moved it to "
                        f"{CHECKPOINTS}/{aside.name} (delete that once you no longer need it)")
    return None, warnings


def _set_aside(path: Path) -> Path:
    target = path.with_name(f"damaged-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"damaged-{path.name}-{n}")
    os.replace(path, target)
    return target


# ---------------------------------------------------------------------------------------------
# Load


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load a checkpoint's weights into `model` (same kind: peft adapter or full weights)."""
    if (folder / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(f"{folder}: adapter weights do not fit this model ({unexpected[:3]} ...)")
        return
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no adapter_config.json and no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f, device="cpu"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if unexpected or missing:
        raise ValueError(f"{folder}: weights do not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


def load_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer and scheduler in place; returns the state (step, rng, data).

    The caller restores the RNG (`restore_rng(state["rng"])`) as the last thing before its loop,
    so nothing built afterwards draws from the restored streams."""
    path = Path(path)
    load_weights(model, path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def checkpoint_config(path: str | os.PathLike[str]) -> str | None:
    f = Path(path) / CONFIG_FILE
    return f.read_text(encoding="utf-8") if f.is_file() else None
