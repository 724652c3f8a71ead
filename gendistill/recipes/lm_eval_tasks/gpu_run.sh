#!/usr/bin/env bash
# Issue 21's GPU run: the demo world's QA as lm-eval tasks (world_lm_mc, world_lm_open), scored both ways through
# lm-eval's task definitions on the GPU demo's teacher and student. Run from the repository root:
#   bash gendistill/recipes/lm_eval_tasks/gpu_run.sh OUT [DEMO_DIR]
# DEMO_DIR: a finished `gendistill demo --scale gpu --out DEMO_DIR` (default: run it now into OUT/demo, ~7 min on
# one H200). The tasks are rewritten from DEMO_DIR's world into OUT/lm_tasks (so they are that world's items) and
# compared with the committed gendistill/recipes/lm_eval_tasks/*.jsonl (seed 0: equal). Writes OUT/eval_lm (records, report).
set -euo pipefail
OUT=$1
DEMO=${2:-$OUT/demo}
mkdir -p "$OUT"
if [ ! -f "$DEMO/summary.json" ]; then
  python3 -m gendistill demo --scale gpu --out "$DEMO" > "$OUT/demo.log" 2>&1
fi
python3 gendistill/recipes/lm_eval_tasks/make_world_tasks.py "$DEMO/world" "$OUT/lm_tasks" > /dev/null
for t in world_lm_mc world_lm_open; do
  if cmp -s "$OUT/lm_tasks/$t.jsonl" "gendistill/recipes/lm_eval_tasks/$t.jsonl"; then echo "$t: the committed items";
  else echo "$t: this world's items differ from the committed ones (another seed or scale)"; fi
done
read -r STUDENT TEACHER < <(python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(d['student'], d['teacher'])" "$DEMO/summary.json")
HF_HUB_OFFLINE=1 python3 -m gendistill eval --model "$STUDENT" --teacher "$TEACHER" \
  --tasks lm-eval:world_lm_mc,lm-eval:world_lm_open --lm-eval-include "$OUT/lm_tasks" \
  --dtype "${DTYPE:-bfloat16}" ${LIMIT:+--limit $LIMIT} --out "$OUT/eval_lm" --overwrite --no-progress 2>&1 \
  | grep -v -e "Building contexts" -e "WARNING" | tee "$OUT/eval_lm.log"
