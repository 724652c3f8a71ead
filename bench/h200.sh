#!/usr/bin/env bash
# Runs gendistill's GPU benchmarks on an H200 machine and keeps Triton's compile/autotune cache (fla kernels take
# minutes to autotune on a fresh machine) in OUT.
#   bash bench/h200.sh OUT LANE [LANE ...]
# A lane is a comma-separated list of steps (step or step:seconds) run one after another on its own GPU; lanes run
# in parallel, lane i on GPU i. Steps: profile host hostfla parity levers kd kd2 bench graphs decode static engine demo.
#   bash bench/h200.sh OUT demo engine,profile    # GPU 0: the GPU demo; GPU 1: the engine, then the profile
set -u
OUT=${1:?usage: bench/h200.sh OUT LANE...}; shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
mkdir -p "$TRITON_CACHE_DIR"
# The cache travels as .cache/triton_cache.tar.xz (carried in) and comes back in parts of < 16 MB (the device
# tool's file limit), which are carried back in as they are.
[ -f .cache/triton_cache.tar.xz ] && tar xJf .cache/triton_cache.tar.xz -C "$TRITON_CACHE_DIR"
ls .cache/triton_cache.tar.xz.part-* >/dev/null 2>&1 && cat .cache/triton_cache.tar.xz.part-* | tar xJf - -C "$TRITON_CACHE_DIR"
R=$(mktemp -d /tmp/h200_results.XXXXXX)  # this call's results only, packed as OUT/results.tgz (the device tool
# returns at most 8 files)

step() {  # step LOG NAME SECONDS command...
  local log=$1 name=$2 limit=$3; shift 3
  echo "== $(date -u +%T) $name (limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?  # before any other command (a $(date) in the echo would reset $?)
  echo "== $(date -u +%T) $name rc=$rc" | tee -a "$log"
}

lane() {  # lane GPU STEPS
  local gpu=$1 log="$R/lane$1.log"
  export CUDA_VISIBLE_DEVICES=$gpu
  for arg in ${2//,/ }; do
    s=${arg%%:*}; t=${arg#*:}; [ "$t" = "$arg" ] && t=""
    case $s in
      profile) step "$log" profile ${t:-240} python3 bench/kernel_profile.py --contexts 4k,128k --decode 32k@16 \
                 --out "$R/kernel_profile_h200.json" ;;
      host)    step "$log" host ${t:-200} python3 bench/host_profile.py --out "$R/host_profile_h200.json" ;;
      hostfla) FLA_DISABLE_BACKEND_DISPATCH=0 step "$log" host-fla-dispatch ${t:-200} python3 bench/host_profile.py \
                 --out "$R/host_profile_h200_fla_dispatch.json" ;;
      parity)  step "$log" parity ${t:-150} python3 bench/kda_parity.py --out "$R/kda_parity_h200.json" ;;
      levers)  step "$log" levers ${t:-300} python3 bench/prefill_levers.py --out "$R/prefill_levers_h200.json" ;;
      kd)      step "$log" kd ${t:-150} python3 bench/kd_step.py --shape qwen3-0.6b --out "$R/kd_step_h200.json" ;;
      kd2)     CUDA_VISIBLE_DEVICES=0,1 step "$log" kd2 ${t:-150} torchrun --nproc-per-node 2 bench/kd_step.py \
                 --shape qwen3-0.6b --out "$R/kd_step_h200x2.json" ;;
      bench)   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "$log" bench ${t:-480} python3 -m gendistill \
                 bench --shape qwen3-0.6b --contexts 4k,16k,64k,128k --decode-context 32k --batch 1 --repeats 3 \
                 --out "$R/bench" ;;
      graphs)  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step "$log" graphs ${t:-360} python3 -m gendistill \
                 bench --shape qwen3-0.6b --contexts 4k,16k --decode-context 32k --batch 1 --repeats 3 \
                 --cuda-graphs --decode-cache static --out "$R/bench_graphs" ;;  # SDPA in graphs: slow beyond 16K
      decode)  step "$log" decode ${t:-150} python3 -m gendistill bench --shape qwen3-0.6b --contexts 4k \
                 --decode-context 32k --batch 1 --repeats 3 --decode-cache dynamic --out "$R/bench_decode" ;;
      static)  step "$log" static ${t:-150} python3 -m gendistill bench --shape qwen3-0.6b --contexts 4k \
                 --decode-context 32k --batch 1 --repeats 3 --decode-cache static --out "$R/bench_decode_static" ;;
      engine)  step "$log" engine ${t:-240} python3 bench/eval_engine.py --shape qwen3-0.6b --device cuda \
                 --dtype bfloat16 --items 32 --batch-sizes 8,32 --max-new-tokens 16 --check-dtype float32 \
                 --check-items 16 --out "$R/eval_engine_h200.json" ;;
      demo)    TRITON_PRINT_AUTOTUNING=1 step "$log" demo ${t:-540} python3 -m gendistill demo --scale gpu \
                 --out "$R/demo" ;;  # prints each autotuning Triton does, with its time
      *) echo "unknown step $s" | tee -a "$log" ;;
    esac
    tar czf "$OUT/results-lane$gpu.tgz" --exclude="*.safetensors" --exclude="*.pt" --exclude="*.arrow" -C "$R" .
  done
}

gpu=0
for steps in "$@"; do lane $gpu "$steps" & gpu=$((gpu + 1)); done
wait
tar czf "$OUT/results.tgz" --exclude="*.safetensors" --exclude="*.pt" --exclude="*.arrow" -C "$R" .
rm -f "$OUT"/results-lane*.tgz
# Triton's cache, xz-compressed (a third of gzip's size), in parts the device tool can return (NO_CACHE_BACK=1: not
# wanted, e.g. on the last call of a session).
if [ -z "${NO_CACHE_BACK:-}" ]; then
  tar cf - -C "$TRITON_CACHE_DIR" . | xz -6 -T0 > /tmp/triton_cache.tar.xz
  split -b 15m /tmp/triton_cache.tar.xz "$OUT/triton_cache.tar.xz.part-"
fi
for f in "$R"/lane*.log; do echo "#### $f"; grep -v "Warning\|warn(" "$f" | tail -n 60; done
