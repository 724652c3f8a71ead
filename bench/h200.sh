#!/usr/bin/env bash
# Runs gendistill's GPU benchmarks on an H200 machine, one step after another, each under its own time limit, and
# keeps Triton's compile/autotune cache (fla kernels take minutes to autotune on a fresh machine) in OUT.
#   bash bench/h200.sh OUT step [step ...]      steps: bench parity kd demo
set -u
OUT=${1:?usage: bench/h200.sh OUT step...}; shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
# The cache comes back in parts of < 16 MB (the device tool's file limit); carry them in .cache/.
ls .cache/triton_cache.tgz.part-* >/dev/null 2>&1 && cat .cache/triton_cache.tgz.part-* | tar xzf - -C "$TRITON_CACHE_DIR"
LOG="$OUT/h200.log"
step() {  # step NAME SECONDS command...
  local name=$1 limit=$2; shift 2
  echo "== $(date -u +%T) $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $(date -u +%T) $name rc=$rc" | tee -a "$LOG"
}
for s in "$@"; do
  case $s in
    parity)  step parity 150 python3 bench/kda_parity.py --out "$OUT/kda_parity_h200.json" ;;
    bench)   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step bench 480 python3 -m gendistill bench \
               --shape qwen3-0.6b --contexts 4k,16k,64k,128k --decode-context 32k --repeats 3 --out "$OUT/bench" ;;
    kd)      step kd 150 python3 bench/kd_step.py --shape qwen3-0.6b --out "$OUT/kd_step_h200.json" ;;
    demo)    step demo 560 python3 -m gendistill demo --scale gpu --out "$OUT/demo" ;;
    *) echo "unknown step $s" | tee -a "$LOG" ;;
  esac
  rm -f "$OUT"/triton_cache.tgz.part-*
  tar czf - -C "$TRITON_CACHE_DIR" . 2>/dev/null | split -b 15m - "$OUT/triton_cache.tgz.part-"
done
grep -v "Warning\|warn(" "$LOG" | tail -n 150
