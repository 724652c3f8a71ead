#!/usr/bin/env bash
# Runs gendistill's GPU benchmarks on an H200 machine, one step after another, each under its own time limit, and
# keeps Triton's compile/autotune cache (fla kernels take minutes to autotune on a fresh machine) in OUT.
#   bash bench/h200.sh OUT step[:seconds] ...      steps: profile parity kd kd2 bench decode static engine demo
set -u
OUT=${1:?usage: bench/h200.sh OUT step...}; shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
mkdir -p "$TRITON_CACHE_DIR"
# The cache comes back in parts of < 16 MB (the device tool's file limit); carry them in .cache/.
ls .cache/triton_cache.tgz.part-* >/dev/null 2>&1 && cat .cache/triton_cache.tgz.part-* | tar xzf - -C "$TRITON_CACHE_DIR"
# Results go to R and come back packed as OUT/results.tgz (the device tool returns at most 8 files).
R=/tmp/h200_results; mkdir -p "$R"
LOG="$R/h200.log"  # also inside results.tgz
step() {  # step NAME SECONDS command...
  local name=$1 limit=$2; shift 2
  echo "== $(date -u +%T) $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $(date -u +%T) $name rc=$rc" | tee -a "$LOG"
}
for arg in "$@"; do
  s=${arg%%:*}; t=${arg#*:}; [ "$t" = "$arg" ] && t=""
  case $s in
    profile) step profile ${t:-200} python3 bench/profile_prefill.py --contexts 4k,128k --out "$R/profile_prefill_h200.json" ;;
    parity)  step parity ${t:-150} python3 bench/kda_parity.py --out "$R/kda_parity_h200.json" ;;
    kd)      step kd ${t:-150} python3 bench/kd_step.py --shape qwen3-0.6b --out "$R/kd_step_h200.json" ;;
    kd2)     step kd2 ${t:-150} torchrun --nproc-per-node 2 bench/kd_step.py --shape qwen3-0.6b --out "$R/kd_step_h200x2.json" ;;
    bench)   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step bench ${t:-480} python3 -m gendistill bench \
               --shape qwen3-0.6b --contexts 4k,16k,64k,128k --decode-context 32k --batch 1 --repeats 3 --out "$R/bench" ;;
    decode)  step decode ${t:-150} python3 -m gendistill bench --shape qwen3-0.6b --contexts 4k --decode-context 32k \
               --batch 1 --repeats 3 --out "$R/bench_decode" ;;  # default allocator (no expandable segments)
    static)  step static ${t:-150} python3 -m gendistill bench --shape qwen3-0.6b --contexts 4k --decode-context 32k \
               --batch 1 --repeats 3 --decode-cache static --out "$R/bench_decode_static" ;;
    engine)  step engine ${t:-150} python3 bench/eval_engine.py --shape qwen3-0.6b --device cuda --dtype bfloat16 \
               --max-new-tokens 16 --check-dtype float32 --out "$R/eval_engine_h200.json" ;;
    demo)    step demo ${t:-560} python3 -m gendistill demo --scale gpu --out "$R/demo" ;;
    *) echo "unknown step $s" | tee -a "$LOG" ;;
  esac
  tar czf "$OUT/results.tgz" --exclude="*.safetensors" --exclude="*.pt" --exclude="*.arrow" -C "$R" .
  # Triton's cache: whole if it fits the transfer limits (64 MiB in all), else only the autotuning decisions.
  rm -f "$OUT"/triton_cache.tgz.part-*
  tar czf /tmp/triton_cache.tgz -C "$TRITON_CACHE_DIR" . 2>/dev/null
  if [ "$(stat -c %s /tmp/triton_cache.tgz)" -gt 55000000 ]; then
    (cd "$TRITON_CACHE_DIR" && find . -name '*autotune*' | tar czf /tmp/triton_cache.tgz -T -)
  fi
  split -b 15m /tmp/triton_cache.tgz "$OUT/triton_cache.tgz.part-"
done
grep -v "Warning\|warn(" "$LOG" | tail -n 150
