#!/usr/bin/env bash
# Stage what benchmarks/gpu_check.sh needs and the GPU machine lacks into .gpu_carry/ (ignored by git):
# the embedded model's config and tokenizer (not its weights). Carry `.gpu_carry` with the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
src=$($PY -c "from sipo_fast.models import default_model_dir; print(default_model_dir())")
dst=.gpu_carry/sipo_fast_cache/$(basename "$src")
mkdir -p "$dst"
find "$src" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$dst/" \;
grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
du -sh .gpu_carry
