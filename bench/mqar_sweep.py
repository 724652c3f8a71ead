"""Seeds x conditions of `bench/mqar_calibration.py`, run in parallel, merged into one result file with a summary.

When content lookup forms is an escape from a plateau, and its step moves with the seed: one run per condition
says little (docs/FINDINGS.md). A grid names conditions (calibration flags) and the seeds to run each with; the
runs go `--jobs` at a time as separate processes (several fit on one GPU: the models are tiny), each writing its own
result into `--work`, where a rerun finds it and skips it (a killed sweep resumes). The merged file holds every run
and, per condition, how many seeds formed lookup (>= 90 % held-out) within the steps and at which steps:

    python bench/mqar_sweep.py --grid qk_norm_cpu --out bench/results/cpu/mqar_qk_norm.json             # 2-core CPU
    python bench/mqar_sweep.py --grid depth_qk_norm --device cuda --jobs 8 --out OUT/mqar_depth.json  # one GPU
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_result  # noqa: E402

TEACHER = "--layers 28 --hidden 256 --kv-heads 2 --mlp 3"  # the GPU world teacher's shape (head_dim 64)


def depth_x_qk_norm(depths) -> dict[str, str]:
    """L<depth>_qk (Qwen3 as it is) and L<depth>_none (without its q/k norms) for each depth."""
    return {f"L{d}_{norm}": f"--layers {d}" + (" --qk-norm none" if norm == "none" else "")
            for d in depths for norm in ("qk", "none")}


# condition name -> calibration flags; every grid's conditions share its `base` flags. budget_s: each run's default
# time limit (on one GPU, eight runs at a time).
GRIDS = {
    # Qwen3's per-head q/k RMSNorm at 4 layers (the CPU calibration's cliff) and at 2 (where lookup forms), 5 seeds.
    "qk_norm_cpu": {"base": "", "steps": 1500, "seeds": [0, 1, 2, 3, 4], "budget_s": None,
                    "conditions": depth_x_qk_norm((4, 2))},
    # Depth x q/k norm at the calibration's width (64; heads of 16), 4 seeds: where the cliff is, and whether the
    # norms are it.
    "depth_qk_norm": {"base": "", "steps": 3000, "seeds": [0, 1, 2, 3], "budget_s": 90,
                      "conditions": depth_x_qk_norm((2, 3, 4, 8))},
    # The GPU teacher's shape, lr 3e-4 (what formed lookup at width 256) and 1e-3, with and without the q/k norms.
    "teacher_shape": {"base": TEACHER, "steps": 4000, "seeds": [0, 1], "budget_s": 240,
                      "conditions": {f"{norm}_lr{lr}": f"--lr {lr}" + (" --qk-norm none" if norm == "none" else "")
                                     for norm in ("qk", "none") for lr in ("3e-4", "1e-3")}},
}


def plan(grid: dict, only: list[str] | None = None, seeds: list[int] | None = None,
         steps: int | None = None) -> list[tuple[str, int, list[str]]]:
    """(condition, seed, calibration argv without --out) for each run of the grid."""
    names = only or list(grid["conditions"])
    unknown = sorted(set(names) - set(grid["conditions"]))
    if unknown:
        raise SystemExit(f"unknown condition(s) {unknown}; this grid has {sorted(grid['conditions'])}")
    return [(name, seed, shlex.split(grid["base"]) + shlex.split(grid["conditions"][name])
             + ["--steps", str(steps or grid["steps"]), "--seed", str(seed)])
            for name in names for seed in (seeds if seeds is not None else grid["seeds"])]


def summarize(runs: dict[str, dict], conditions: list[str]) -> list[dict]:
    """Per condition: seeds run, seeds that reached 90 % held-out, and each seed's first step at 50 % / 90 %."""
    rows = []
    for name in conditions:
        mine = sorted((r for r in runs.values() if r["condition"] == name), key=lambda r: r["config"]["seed"])
        if not mine:
            continue
        steps = [r["curve"][-1]["step"] if r["curve"] else 0 for r in mine]
        rows.append({"condition": name, "seeds": len(mine),
                     "formed": sum(r["first_step_at"]["0.9"] is not None for r in mine),
                     "first_50": " ".join(str(r["first_step_at"]["0.5"] or "-") for r in mine),
                     "first_90": " ".join(str(r["first_step_at"]["0.9"] or "-") for r in mine),
                     "steps_run": " ".join(map(str, steps)),
                     "final_heldout": " ".join(f"{r['curve'][-1]['heldout']:.2f}" if r["curve"] else "-"
                                               for r in mine)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), required=True)
    p.add_argument("--only", help="comma-separated conditions of the grid (default: all)")
    p.add_argument("--seeds", help="comma-separated seeds instead of the grid's")
    p.add_argument("--steps", type=int, help="each run's step limit instead of the grid's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each one process, one thread)")
    p.add_argument("--budget-s", type=float, help="each run stops at its first evaluation after this many seconds "
                                                  "(default: the grid's)")
    p.add_argument("--work", help="where each run's result goes (default: <out>.runs/); existing ones are reused")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    grid = GRIDS[args.grid]
    runs_plan = plan(grid, args.only.split(",") if args.only else None,
                     [int(s) for s in args.seeds.split(",")] if args.seeds else None, args.steps)
    work = Path(args.work or args.out + ".runs")
    work.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve().parent / "mqar_calibration.py"

    def run(item):
        name, seed, flags = item
        result = work / f"{name}_s{seed}.json"
        if not result.exists():
            cmd = [sys.executable, str(script), *flags, "--device", args.device, "--out", str(result)]
            budget = args.budget_s or grid["budget_s"]
            if budget:
                cmd += ["--budget-s", str(budget)]
            with open(work / f"{name}_s{seed}.log", "w") as log:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                print(f"{name} seed {seed}: exit {code}, see {work / f'{name}_s{seed}.log'}", flush=True)
                return None
        data = json.loads(result.read_text())
        print(f"{name} seed {seed}: first step at 50 % / 90 %: {data['first_step_at']['0.5']} / "
              f"{data['first_step_at']['0.9']}", flush=True)
        return f"{name}_s{seed}", {"condition": name, **data}

    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = dict(r for r in pool.map(run, runs_plan) if r is not None)
    conditions = list(dict.fromkeys(name for name, _, _ in runs_plan))
    summary = summarize(runs, conditions)
    print_table(summary, ["condition", "seeds", "formed", "first_50", "first_90", "steps_run", "final_heldout"])
    write_result(args.out, {"benchmark": "bench/mqar_sweep.py", "grid": args.grid, "base": grid["base"],
                            "conditions": {c: grid["conditions"][c] for c in conditions}, "summary": summary,
                            "runs": runs, "wall_s": round(time.time() - t0, 1), **environment()})
    return 0 if len(runs) == len(runs_plan) else 1


if __name__ == "__main__":
    sys.exit(main())
