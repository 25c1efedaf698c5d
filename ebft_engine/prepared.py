"""`dataset_prepared_path`: the transformed, tokenized rows cached on disk (axolotl's key).

Loading and transforming a large dataset is slow and gives the same rows every time nothing that
made them changed. With `dataset_prepared_path: DIR` the rows of `datasets:` (and, apart, of
`test_datasets:`) are saved under `DIR/<key>/` (`datasets.Dataset.save_to_disk`), where the key
is a hash of everything that produced them:

- the config, less the keys that cannot change a row (`ROW_INDEPENDENT`: optimizer, schedule,
  checkpoints, logging, LoRA, precision, devices, ...): a key not in that list counts, so a new
  key can only cause a rebuild, never a stale cache;
- the dataset entries and, for local paths, each file's size and modification time;
- the transform's source (every built-in transform and the code they share; a user module's file);
- the tokenizer: its class, name, vocabulary, special tokens and chat template;
- the ebft version.

A cache folder is written beside its final name and renamed into place, so a killed run leaves no
half-written cache; a folder that fails to load is rebuilt. `val_set_size` splits after the cache,
so a new hold-out size reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ebft_engine import __version__
from ebft_engine.config import DatasetConfig, EbftConfig

if TYPE_CHECKING:
    import datasets

ROW_INDEPENDENT = frozenset({
    "output_dir", "max_steps", "num_epochs", "learning_rate", "optimizer", "lr_scheduler", "warmup_steps",
    "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "seed",
    "val_set_size", "logging_steps", "save_steps", "save_strategy", "saves_per_epoch", "save_first_step",
    "save_total_limit", "resume_from_checkpoint", "auto_resume_from_checkpoints", "eval_steps",
    "eval_strategy", "evals_per_epoch", "eval_max_rows", "eval_pass_at_1", "early_stopping_patience",
    "metric_for_best_model", "greater_is_better", "wandb_project", "wandb_entity", "wandb_name",
    "wandb_run_id", "wandb_mode", "dataset_prepared_path", "device", "vllm", "micro_batch_size",
    "gradient_accumulation_steps", "batch_size", "bf16", "fp16", "tf32", "torch_dtype", "flash_attention",
    "flex_attention", "attn_implementation", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "torch_compile", "activation_offloading", "adapter", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_linear", "lora_target_modules",
})
"""Top-level config keys that cannot change a transformed row (everything else is in the key)."""

TRANSFORMS_DIR = Path(__file__).resolve().with_name("transforms")
SHARED_CODE = (Path(__file__).resolve().with_name("data.py"),)


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


def _files_fingerprint(spec: DatasetConfig) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of a local source's files; nothing for hub ids and builtin: sets."""
    path = Path(spec.path).expanduser()
    if not path.exists():
        return []
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _transform_fingerprint(type_name: str | None) -> str:
    """The source of the code that transforms rows of this `type`."""
    if not type_name:
        return ""
    from ebft_engine.transforms import transform_module_file

    module_file = transform_module_file(type_name)
    if module_file is not None and TRANSFORMS_DIR in module_file.parents:
        files = sorted(TRANSFORMS_DIR.glob("*.py")) + list(SHARED_CODE)
    else:
        files = ([module_file] if module_file is not None else []) + list(SHARED_CODE)
    return _digest("".join(_digest(f.read_bytes()) for f in files))


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    if tokenizer is None:
        return ""
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), json.dumps(vocab),
             json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
             str(getattr(tokenizer, "chat_template", ""))]
    return _digest("\n".join(parts))


def prepared_key(cfg: EbftConfig, entries: Sequence[DatasetConfig], tokenizer: Any) -> str:
    """The hash that names a cache folder (see the module docstring for what goes in)."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in ROW_INDEPENDENT}
    payload = {
        "ebft": __version__,
        "config": config,
        "entries": [e.model_dump(mode="json") for e in entries],
        "files": [_files_fingerprint(e) for e in entries],
        "transforms": [_transform_fingerprint(e.type) for e in entries],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return _digest(json.dumps(payload, sort_keys=True, default=str))[:20]


def cached(cfg: EbftConfig, entries: Sequence[DatasetConfig], tokenizer: Any,
           build: Callable[[], "datasets.Dataset"]) -> "datasets.Dataset":
    """The rows from `dataset_prepared_path/<key>/` when there, else `build()` saved there."""
    import datasets

    assert cfg.dataset_prepared_path is not None
    root = Path(cfg.dataset_prepared_path).expanduser()
    final = root / prepared_key(cfg, entries, tokenizer)
    if final.is_dir():
        try:
            return datasets.load_from_disk(str(final))
        except (OSError, ValueError, FileNotFoundError):
            shutil.rmtree(final, ignore_errors=True)  # a damaged cache: rebuild it
    rows = build()
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    rows.save_to_disk(str(tmp))
    try:
        os.replace(tmp, final)
    except OSError:  # another run saved the same key first: theirs is the same rows
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(final)) if final.is_dir() else rows
