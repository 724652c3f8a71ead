#!/usr/bin/env bash
# Distillation throughput (issue 23) on one GPU, everything in one call of about 7 minutes, results into OUT:
#   kd_step.json      every stage objective x seq len (2048, 4096) x lever: tokens/s, model FLOPs/token, MFU, peak
#                     memory, first-step latency; the levers that paid (`optimized`) and the loss-curve check. Its
#                     first row starts on an empty Triton cache: cold_start_first_step_s is the cold start.
#                     `profiles`: the kd and ce steps under torch.profiler (baseline, optimized): kernel time by
#                     category, idle time, MFU = busy x GEMM share x GEMM rate (bench/profiling.py)
#   fla_configs/      the fla kernel configs that run's autotuning chose (pinned configs: gendistill/kernels/configs)
#   cold_pinned.json  the cold start again, a fresh process on an empty Triton cache with those configs pinned
#   pytest_levers.txt the GPU tests of the levers (Liger's kernels against the chunked KD, compiled fla blocks)
#   *.log             each step's output
#   bash bench/gpu_throughput.sh OUT                 # BUDGET_S (default 240): seconds the main bench may start rows in
# After installing the wheels (.whl/: fla, liger-kernel) onto PYTHONPATH. The 2-GPU run: bench/gpu_throughput_x2.sh.
set -u
OUT=${1:?usage: bash bench/gpu_throughput.sh OUT}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GENDISTILL_COMMIT=${GENDISTILL_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
PY=${PYTHON:-python3}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gendistill-throughput.XXXXXX")
failed=()

step() {  # step NAME TIMEOUT_S command...: runs it with a hard time limit, logs it, remembers a failure
  local name=$1 limit=$2; shift 2
  echo "== $(date -u +%T) $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 60 "$OUT/$name.log"
  echo "== $(date -u +%T) $name: exit $rc"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# 1. the bench, starting cold (an empty Triton cache), rows in priority order until BUDGET_S
TRITON_CACHE_DIR=$SCRATCH/triton-cold step kd_step 290 "$PY" bench/kd_step.py --shape qwen3-0.6b --plan gpu \
  --budget-s "${BUDGET_S:-240}" --export-fla-configs "$OUT/fla_configs" --out "$OUT/kd_step.json"
# 2. the cold start with the configs just exported pinned: a fresh process, another empty Triton cache
if [ -f "$OUT/fla_configs/manifest.json" ]; then
  TRITON_CACHE_DIR=$SCRATCH/triton-pinned FLA_CONFIG_DIR=$OUT/fla_configs FLA_CACHE_MODE=strict \
    step cold_pinned 70 "$PY" bench/kd_step.py --shape qwen3-0.6b --rows kd --seq-lens 2048 --levers "" \
    --optimized none --curves 0 --steps 1 --warmup 1 --no-hf --out "$OUT/cold_pinned.json"
fi
# 3. the levers' GPU tests
TRITON_CACHE_DIR=$SCRATCH/triton-cold step pytest_levers 70 "$PY" -m pytest -q -m gpu tests/test_gpu.py \
  -k "liger or compiled or kernels" -p no:cacheprovider
cp "$OUT/pytest_levers.log" "$OUT/pytest_levers.txt" 2>/dev/null
rm -rf "$SCRATCH"
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
