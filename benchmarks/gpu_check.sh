#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (no network there). Run from the repository root:
#     bash benchmarks/gpu_prepare.sh          # HERE, once: stages the tokenizer/config into .gpu_carry/
#     device run (carry: .gpu_carry)  ->  bash benchmarks/gpu_check.sh
# It builds sipo_fast._C against the machine's CUDA torch, runs the GPU tests (Triton kernels compiled for
# real: MOD mix/sample, fused log-probs, paged attention; the paged cache) and the op-level benchmarks, and
# writes logs and RESULTS fragments under $OUT. Installs nothing. Budget: about 8 minutes.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The embedded model's weights do not travel (the GGUF package is larger than the carry limit); its tokenizer
# and config do, which is all the kernels, tests and random-weight benchmarks need.
[ -d .gpu_carry/sipo_fast_cache ] && export SIPO_FAST_CACHE=$PWD/.gpu_carry/sipo_fast_cache
[ -d .gpu_carry/whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PYTHONPATH
PY=python3
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"

step() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "$name rc=$?" | tee -a "$OUT/summary.txt"; tail -n 25 "$OUT/$name.log"; }

step build 240 $PY setup.py build_ext --inplace
step env 60 $PY -m sipo_fast.env_report
# test_distributed.py's gpu test: a rank's share of the decoding batches (issue 8's sharding) decodes on CUDA
# exactly as in one process, float32 and bfloat16 (the multi-process tests themselves need trl/datasets,
# which this image lacks, and more than one GPU for NCCL; they run on CPU with gloo in the suite).
step gpu_tests 240 $PY -m pytest -q -ra -m "gpu" tests/test_mod_ops.py tests/test_logprobs.py \
  tests/test_paged_attention.py tests/test_paged_cache.py tests/test_distributed.py
step bench_logprobs_op 150 $PY benchmarks/bench_logprobs.py --skip-scoring --repeat 5
step bench_kv_sharing 120 $PY benchmarks/bench_kv_sharing.py --model tiny --no-record
cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
cat "$OUT/summary.txt"
