#!/usr/bin/env bash
# Distillation throughput on 2 GPUs with FSDP2 (issue 23): the rows of bench/gpu_throughput.sh at baseline and at the
# levers the one-GPU run kept, tokens/s per GPU, and each row's scaling efficiency against the one-GPU result.
#   bash bench/gpu_throughput_x2.sh OUT [ONE_GPU_RESULT]   # default: bench/results/h200/kd_step.json
# Writes OUT/kd_step_x2.json and OUT/kd_step_x2.log.
set -u
OUT=${1:?usage: bash bench/gpu_throughput_x2.sh OUT [ONE_GPU_RESULT]}
ONE=${2:-bench/results/h200/kd_step.json}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GENDISTILL_COMMIT=${GENDISTILL_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gendistill-triton.XXXXXX")}
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1} timeout --signal=INT 540 torchrun --nproc-per-node 2 \
  bench/kd_step.py --shape qwen3-0.6b --plan gpu2 --optimized "from:$ONE" --compare "$ONE" \
  --budget-s "${BUDGET_S:-420}" --out "$OUT/kd_step_x2.json" 2>&1 | tee "$OUT/kd_step_x2.log"
