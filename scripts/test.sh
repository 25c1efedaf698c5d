#!/usr/bin/env bash
# The README's test command: sets itself up, then runs the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. "${EBFT_VENV:-.venv}/bin/activate"
exec python -m pytest -q -ra "$@"
