#!/usr/bin/env bash
# The README's main command: sets itself up, then runs a real, short EBFT run on CPU
# (SmolLM2-135M, HumanEval code, strided mode) and shows it live in the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. "${EBFT_VENV:-.venv}/bin/activate"
exec ebft run --headless smollm2-135m-strided-cpu "$@"
