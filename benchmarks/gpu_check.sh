#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (no network there). Run from the repository root:
#     bash benchmarks/gpu_prepare.sh          # HERE, once: stages the tokenizer/config into .gpu_carry/
#     device run (carry: .gpu_carry)  ->  bash benchmarks/gpu_check.sh
# From a bare checkout: installs the package in place offline (--no-deps --no-build-isolation, the C++
# extension built by ninja in parallel), then, most important first: the GPU MOD-decoding benchmark
# (authors / naive / MODDecoder eager / captured; 135M- and 1.7B-shaped policies, a 7B base with two LoRA
# adapters), every GPU test, and the op benchmarks. Logs, JSON and RESULTS fragments go to $OUT.
# Budget: about 6 minutes on an H200 (GPU_CHECK_SHAPES / GPU_CHECK_SKIP=bench,tests,ops trim it).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# The embedded model's weights do not travel (the GGUF package is larger than the carry limit); its tokenizer
# and config do, which is all the kernels, tests and random-weight benchmarks need.
[ -d .gpu_carry/sipo_fast_cache ] && export SIPO_FAST_CACHE=$PWD/.gpu_carry/sipo_fast_cache
[ -d .gpu_carry/whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
PY=python3
SKIP=${GPU_CHECK_SKIP:-}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"

step() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc ${limit}s-limit took $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"; tail -n 30 "$OUT/$name.log"; }

step install 150 $PY -m pip install --no-deps --no-build-isolation --no-index -e .
step env 60 $PY -m sipo_fast.env_report
[[ $SKIP == *bench* ]] || step bench_mod_gpu 250 $PY benchmarks/bench_mod_decode_gpu.py \
  --shapes "${GPU_CHECK_SHAPES:-135m,1.7b,7b-lora}" --out "$OUT/mod_gpu.json" --no-record
# Every GPU test: the Triton kernels compiled for real (MOD mix/sample, fused log-probs, paged attention, the
# decode-step ops), the paged cache, the captured decoder (graph replay = eager = reference in float32), and a
# rank's share of the decoding batches (the multi-process tests need trl/datasets, absent from the image).
[[ $SKIP == *tests* ]] || step gpu_tests 180 $PY -m pytest -q -ra -m gpu tests/test_decode_ops.py \
  tests/test_captured_decoding.py tests/test_mod_ops.py tests/test_logprobs.py tests/test_paged_attention.py \
  tests/test_paged_cache.py tests/test_distributed.py
[[ $SKIP == *ops* ]] || step bench_logprobs_op 90 $PY benchmarks/bench_logprobs.py --skip-scoring --repeat 3
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
cat "$OUT/summary.txt"
