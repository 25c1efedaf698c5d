"""Where a model or a dataset comes from: `builtin:NAME`, a local path, or a Hugging Face Hub id.

One rule for training (modeling.py, data.py) and for the checks before it (preflight.py), so that
`ebft validate` never calls a path a hub id that training then treats as a path, or the reverse.
A hub id is `name` or `owner/name` of letters, digits, `-`, `_` and `.` (the Hub's own rule: at
most 96 characters a part, no `--` or `..`, not starting or ending with `-` or `.`). Anything else
that names no existing file is a local path that does not exist.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[\w.\-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}(?:/{_HUB_PART})?$")
LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def looks_like_hub_id(text: str) -> bool:
    """`Qwen/Qwen3-4B`, `gpt2`: could name a Hub repository (the Hub may still not have it)."""
    return bool(_HUB_ID.match(text))


def is_builtin(text: str) -> bool:
    return text.startswith("builtin:")


def is_local(text: str, local_suffixes: tuple[str, ...] = ()) -> bool:
    """A path on this machine (existing or not): it exists, starts like a path, has one of
    `local_suffixes` (`data.jsonl`), or cannot be a hub id (`runs/a/b`, `my model`)."""
    if is_builtin(text):
        return False
    return (Path(text).expanduser().exists() or text.startswith(LOCAL_PREFIXES)
            or Path(text).suffix.lower() in local_suffixes or not looks_like_hub_id(text))
