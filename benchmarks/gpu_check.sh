#!/usr/bin/env bash
# Every GPU check of the project in one go, for a short loan of a GPU machine (about 15 minutes):
# installs the gpu extra, runs the tests skipped on CPU (real vLLM against transformers, seeded vLLM
# sampling, NCCL + bf16 FSDP on two GPUs where there are two) and the GPU throughput benchmark, and
# writes everything under one results folder (default benchmarks/results/gpu-<date>; $OUT if set).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on the GPU machine
#
# Each step's output goes to <results>/<step>.log; a step that fails does not stop the next one.
# Not run yet: no GPU has been lent to this project (README, "GPU scale").
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$RESULTS"
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "[gpu-check] $name: $*"
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  echo "[gpu-check] $name: exit $?" | tee -a "$RESULTS/summary.txt"
}
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || echo "[gpu-check] no nvidia-smi" | tee -a "$RESULTS/summary.txt"
step install 300 pip install -q torch==2.13.0 -e ".[test,gpu]" "vllm==0.32.0"   # vLLM 0.32.0 pins this torch
step gpu-tests 240 python -m pytest -q -m gpu -rs tests/test_vllm.py tests/test_distributed.py
step throughput 300 python -m benchmarks.gpu_throughput --out "$RESULTS"
echo "[gpu-check] results in $RESULTS"
