#!/usr/bin/env bash
# The GPU proof kit: measures ebft on one lent GPU (H100/H200) in one call, under 8 minutes.
#
#   bash scripts/gpu-check.sh [OUT_DIR] [--only PART,...]   # on the GPU machine; OUT_DIR defaults to $OUT
#   bash scripts/gpu-check.sh --rehearse [OUT_DIR]          # the same parts on the CPU, tiny sizes (CI)
#
# Before lending: `bash scripts/gpu-wheels.sh` here fills .gpu-kit/ (the wheels the engine needs that
# the GPU machine lacks, SmolLM2's config and tokenizer); carry `.gpu-kit` with the call. This script
# installs those wheels into a private folder first (never into the machine's own Python), then runs
# scripts/gpu_check.py: the environment, the CUDA-only tests, a real strided and a real structured run,
# the three strided benches; it writes OUT_DIR/gpu-report.md, gpu-report.json and gpu-kit.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export EBFT_KIT_COMMAND="bash scripts/gpu-check.sh $*"

rehearse=0 out="" rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rehearse) rehearse=1 ;;
        --only) rest+=("--only" "$2"); shift ;;
        --only=*|--budget-s=*) rest+=("$1") ;;
        --budget-s) rest+=("--budget-s" "$2"); shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        -*) echo "gpu-check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) out="$1" ;;
    esac
    shift
done
out="${out:-${OUT:-gpu-report}}"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$rehearse" = 1 ]; then
    rest+=("--rehearse")
elif compgen -G ".gpu-kit/wheels/*.whl" >/dev/null; then
    site="${EBFT_KIT_SITE:-/tmp/ebft-kit-site}"
    echo "[gpu-check] installing $(ls .gpu-kit/wheels/*.whl | wc -l) carried wheels into $site"
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .gpu-kit/wheels/*.whl; then
        export PYTHONPATH="$site:$PYTHONPATH"
    else
        echo "[gpu-check] the wheels did not install; the report's environment shows what is missing" >&2
    fi
else
    echo "[gpu-check] no .gpu-kit/wheels: run scripts/gpu-wheels.sh here first if this machine lacks pydantic & co."
fi
exec "$py" scripts/gpu_check.py run --out "$out" "${rest[@]}"
