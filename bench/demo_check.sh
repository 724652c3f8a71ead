#!/usr/bin/env bash
# Issue 22's GPU check, in one call on a fresh one-GPU machine: `gendistill demo --scale gpu` from nothing (no cached
# teacher, an empty Triton cache, so fla compiles and autotunes every kernel), timed; then bench/demo_check.py
# prints the phase times, the teacher's accuracy and answer rates, recall by length, the student's retention and a
# PASS/FAIL line per requirement. Run from the repository root:
#   bash bench/demo_check.sh OUT [WORK]
# OUT receives only small files (logs, summary.json, the report, check.txt); the models, checkpoints and caches go to
# WORK (default /tmp/gendistill_gpu_check), so that OUT travels back quickly.
# EXTRAS=1: afterwards, while the elapsed time allows (EXTRAS_BEFORE seconds, default 450), also the fidelity test on
# the trained weights (tests/test_gpu.py) and then, before EXTRAS_LM_BEFORE (default 420), the lm-eval world run
# (gendistill/recipes/lm_eval_tasks/gpu_run.sh, LIMIT=${LM_LIMIT:-200} items per task), each with its log in OUT.
# DEMO_TIMEOUT (default 555 s) stops a demo that would not finish, so that its log still comes back.
set -uo pipefail
OUT=${1:?usage: bash bench/demo_check.sh OUT [WORK]}
WORK=${2:-/tmp/gendistill_gpu_check}
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
export TRITON_CACHE_DIR="$WORK/triton_cache"  # empty: the cold start is part of what is measured
export GENDISTILL_CACHE="$WORK/teachers"
export PYTHONUNBUFFERED=1
start=$(date +%s.%N)
python3 - <<'EOF' > "$OUT/environment.txt" 2>&1
import platform, torch, transformers, triton
import importlib.metadata as md
try:
    fla = md.version("fla-core")
except md.PackageNotFoundError:
    fla = "not installed"
print(platform.platform(), torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__, "fla", fla)
print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
cat "$OUT/environment.txt"
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true

timeout --signal=INT --kill-after=15 "${DEMO_TIMEOUT:-555}" python3 -m gendistill demo --scale gpu --out "$WORK/demo" \
  --cache "$WORK/teachers" --fresh-teacher 2>&1 | tr '\r' '\n' | grep --line-buffered -v -E "^\s*$|it/s\]$|s/it\]$" \
  | tee "$OUT/demo.log"
rc=${PIPESTATUS[0]}
end=$(date +%s.%N)
wall=$(python3 -c "print(f'{$end - $start:.1f}')")
echo "demo exit code $rc, wall clock $wall s" | tee -a "$OUT/demo.log"

for f in summary.json eval/report.md eval/report.json eval/report.html eval/manifest.json kernel_warmup.log; do
  [ -f "$WORK/demo/$f" ] && cp "$WORK/demo/$f" "$OUT/$(basename "$f")"
done
for model in teacher student; do  # the seen people's items, output by output (the rest stays in WORK)
  mkdir -p "$OUT/records/$model"
  cp "$WORK/demo"/eval*/records/"$model"/world_qa_*_seen.jsonl "$OUT/records/$model/" 2>/dev/null || true
done
# fla's autotune results (kernel, key, timing of every config), small JSON files: the data to pin configurations later.
mkdir -p "$OUT/autotune"
find "$TRITON_CACHE_DIR" -name "*.autotune.json" 2>/dev/null | while read -r f; do
  cp "$f" "$OUT/autotune/$(basename "$(dirname "$f")")-$(basename "$f")"
done
echo "autotune results kept: $(ls "$OUT/autotune" | wc -l)"
python3 bench/demo_check.py "$WORK/demo" --wall "$wall" 2>&1 | tee "$OUT/check.txt"

if [ "${EXTRAS:-0}" = "1" ] && [ "$rc" = "0" ]; then
  elapsed() { python3 -c "import time; print(int(time.time() - $start))"; }
  if [ "$(elapsed)" -lt "${EXTRAS_BEFORE:-450}" ]; then
    echo "== fidelity test on the trained weights (elapsed $(elapsed) s)"
    GENDISTILL_TRAINED_RUN="$WORK/demo" timeout 120 python3 -m pytest -m gpu -q -s -k fidelity tests/test_gpu.py \
      2>&1 | tail -20 | tee "$OUT/fidelity.txt"
  fi
  if [ "$(elapsed)" -lt "${EXTRAS_LM_BEFORE:-420}" ]; then
    echo "== lm-eval world tasks (elapsed $(elapsed) s)"
    LIMIT=${LM_LIMIT:-200} timeout $((570 - $(elapsed))) bash gendistill/recipes/lm_eval_tasks/gpu_run.sh "$WORK/lm" "$WORK/demo" \
      2>&1 | tail -40 | tee "$OUT/lm_eval.txt"
    cp "$WORK/lm/eval_lm/report.md" "$OUT/lm_eval_report.md" 2>/dev/null || true
  fi
fi
echo "total elapsed $(python3 -c "import time; print(int(time.time() - $start))") s"
