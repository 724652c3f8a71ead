#!/usr/bin/env bash
# Runs gendistill's GPU benchmarks on this machine's first GPU and writes each one's latest result under
# bench/results/<gpu>/ (<gpu>: the card's name, e.g. h200), replacing the previous one. Each result file records its
# command, commit, versions and date; bench/results/<gpu>/RESULTS.md is the table to update from them.
#   bash bench/gpu.sh                    # the default: bench and graphs
#   bash bench/gpu.sh tests bench graphs host profile parity kd kd2 engine demo
# Steps (run in the order given; one failing does not stop the others, the script exits non-zero at the end):
#   tests    pytest -m gpu (GENDISTILL_TRAINED_RUN: a trained run for the fidelity test)         -> pytest_gpu.txt
#            (TESTS_TIMEOUT_S: stop it then, with its summary; TEST_WORKERS: xdist workers, default 6)
#   bench    gendistill bench, eager, 4K-128K prefill (forward and generate()), decode at 32K    -> bench/
#   graphs   the same at 4K/16K with the prefill and decode steps replayed as CUDA graphs       -> bench_graphs/
#   host     bench/host_profile.py: where the host's time goes in a 4K prefill                    -> host_profile.json
#   profile  bench/kernel_profile.py: kernel time per category at 4K and 128K, decode at 32K      -> kernel_profile.json
#   parity   bench/kda_parity.py: fla's KDA kernels against the PyTorch paths                     -> kda_parity.json
#   kd, kd2  bench/kd_step.py: every stage objective and lever on one GPU, and FSDP2 on two         -> kd_step.json, kd_step_x2.json
#   engine   bench/eval_engine.py: the batched generation engine against one-by-one generate     -> eval_engine.json
#   demo     gendistill demo --scale gpu: the whole pipeline; its report                          -> demo/
#   mqar     bench/mqar_sweep.py: when content lookup forms: depth x Qwen3's q/k norms (4 seeds), the GPU world
#            teacher's shape; 8 runs at a time, each in its grid's time limit (~10 min) -> mqar_depth/teacher.json
#   export   gendistill kernels export --mixers all: fla's autotuned configs for every mixer's training and prefill
#            kernels at the 0.6B shape, on an empty Triton cache, to ship under gendistill/kernels/configs/ -> fla_configs/
# Environment: GPU_NAME overrides <gpu>; GENDISTILL_COMMIT names the commit where the tree has no .git (a copy).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
export GENDISTILL_COMMIT=${GENDISTILL_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
# Triton's compile and autotune cache: fla's kernels take minutes to autotune on a fresh machine.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
GPU=${GPU_NAME:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' |
                  sed -e 's/nvidia//' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')}
R=bench/results/${GPU:?no GPU found (set GPU_NAME)}
mkdir -p "$R" "$TRITON_CACHE_DIR"
PY=${PYTHON:-python3}
BENCH=("$PY" -m gendistill bench --shape qwen3-0.6b --decode-context 32k --batch 1 --repeats 3 --no-plots --overwrite)
failed=()

run() {  # run NAME command...: prints the command and its time, remembers a failure
  local name=$1; shift
  echo "== $(date -u +%T) $name: $*"
  "$@"
  local rc=$?
  echo "== $(date -u +%T) $name: exit $rc"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

for step in "${@:-bench graphs}"; do
  for s in $step; do
    case $s in
      # xdist workers where it is installed: on a fresh machine the tests' time is fla compiling and autotuning its
      # kernels (minutes, one test after another), which workers do in parallel on the host's cores
      tests)   N=(); "$PY" -c "import xdist" 2>/dev/null && N=(-n "${TEST_WORKERS:-6}")
               # -o addopts=: pyproject's -q would cancel -v (no test names); TESTS_TIMEOUT_S: SIGINT at that time, so pytest
               # still prints its summary (which tests failed, and why) before a call's hard limit
               T=(); [ -n "${TESTS_TIMEOUT_S:-}" ] && T=(timeout --signal=INT --kill-after=30 "$TESTS_TIMEOUT_S")
               run tests "${T[@]}" "$PY" -m pytest -m gpu -o addopts= -v -p no:cacheprovider -rfE --durations=0 "${N[@]}" tests \
                 > "$R/pytest_gpu.txt" 2>&1; tail -n 3 "$R/pytest_gpu.txt" ;;
      # expandable segments: the 128K prefills and the largest decode batches fill the card without fragmenting it
      bench)   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run bench "${BENCH[@]}" \
                 --contexts 4k,16k,32k,64k,128k --out "$R/bench" ;;
      # SDPA replayed in a graph is slower than eagerly beyond 16K: graphs pay for short, host-bound prefills only
      graphs)  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run graphs "${BENCH[@]}" \
                 --contexts 4k,16k --generate-contexts none --cuda-graphs --out "$R/bench_graphs" ;;
      host)    run host "$PY" bench/host_profile.py --out "$R/host_profile.json" ;;
      profile) run profile "$PY" bench/kernel_profile.py --contexts 4k,128k --decode 32k@16 \
                 --out "$R/kernel_profile.json" ;;
      parity)  run parity "$PY" bench/kda_parity.py --out "$R/kda_parity.json" ;;
      kd)      run kd "$PY" bench/kd_step.py --shape qwen3-0.6b --out "$R/kd_step.json" ;;
      kd2)     CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1} run kd2 torchrun --nproc-per-node 2 bench/kd_step.py \
                 --shape qwen3-0.6b --plan gpu2 --optimized "from:$R/kd_step.json" --compare "$R/kd_step.json" \
                 --out "$R/kd_step_x2.json" ;;
      engine)  run engine "$PY" bench/eval_engine.py --shape qwen3-0.6b --device cuda --dtype bfloat16 --items 32 \
                 --batch-sizes 8,32 --max-new-tokens 16 --check-dtype float32 --check-items 16 \
                 --out "$R/eval_engine.json" ;;
      demo)    D=${TMPDIR:-/tmp}/gendistill-gpu-demo  # the demo's models and data stay out of the results
               run demo "$PY" -m gendistill demo --scale gpu --out "$D" && rm -rf "$R/demo" && mkdir -p "$R/demo" &&
                 cp "$D"/eval/report.md "$D"/eval/report.json "$D"/summary.json "$R/demo/" ;;
      # tiny models: eight runs share the card; its result is steps, not time, so other work beside it is harmless
      mqar)    for g in depth_qk_norm:mqar_depth teacher_shape:mqar_teacher; do
                 run "mqar ${g%%:*}" "$PY" bench/mqar_sweep.py --grid "${g%%:*}" --device cuda --jobs 8 \
                   --work "${TMPDIR:-/tmp}/mqar-${g%%:*}" --out "$R/${g#*:}.json"
               done ;;
      # its own empty cache and no pinned set, so that every kernel autotunes at this shape
      export)  rm -rf "$R/fla_configs" && FLA_CACHE_MODE=disabled TRITON_CACHE_DIR=$(mktemp -d) run export "$PY" -m \
                 gendistill kernels export "$R/fla_configs" --mixers all ;;
      *) echo "unknown step $s (see the head of $0)"; failed+=("$s") ;;
    esac
  done
done
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
