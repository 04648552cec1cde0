#!/usr/bin/env bash
# The GPU check of the fast path (issue 16) and of FSDP2 distillation (issue 20), for a GPU machine: the CUDA-marked
# tests (FSDP2 through accelerate on the GPUs among them), the tiny pipeline on CUDA in
# bf16 (inside those tests), and the fp32/bf16 step-time table on a SmolLM2-135M-shaped model. Prepare with
# `bash benchmarks/gpu_prepare.sh` on a machine with the project's environment, then, on the GPU machine, from the
# repository root with .whl/ and .gpu_cache/ carried:
#     bash benchmarks/gpu_check.sh        # figures in $OUT (or benchmarks/results/): gpu_check.json, gpu_check_tests.log
# About 5 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
[ -d .gpu_cache ] && export PEFT_POST_CACHE="$PWD/.gpu_cache"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_check_nvidia_smi.txt"
timeout 300 python3 -m pytest -p no:cacheprovider -q -m cuda tests/test_cuda.py tests/test_low_precision.py \
  tests/test_multiprocess.py 2>&1 | tee "$out/gpu_check_tests.log"
tests_rc=${PIPESTATUS[0]}
# A relative --out: the JSON records its command, and a committed result holds no machine path.
timeout 240 python3 benchmarks/precision.py --device cuda --model random:smollm2-135m --rounds 5 --threads 4 \
  --out benchmarks/results/gpu_check.json 2>&1 | tail -40
bench_rc=${PIPESTATUS[0]}
[ "$out" != benchmarks/results ] && cp benchmarks/results/gpu_check.json "$out/" 2>/dev/null
echo "tests rc=$tests_rc benchmark rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
