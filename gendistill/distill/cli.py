"""`gendistill distill RECIPE.yaml [--set stage.key=value ...] [--resume | --from-stage N | --overwrite] [--check]
[--allow-code]`

Several processes: `torchrun --nproc-per-node N -m gendistill distill RECIPE.yaml` (FSDP2, or `--set parallel=ddp`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Run a GenDistill recipe: its stages in order, each leaving a Hugging Face model dir.",
        epilog="examples:\n"
               "  %(prog)s paper.yaml\n"
               "  %(prog)s paper.yaml --set kd.lr=1e-5 --set '*.seq_len=1024' --set out_dir=runs/x\n"
               "  %(prog)s paper.yaml --resume\n"
               "  %(prog)s paper.yaml --set kd.lr=1e-5 --from-stage kd\n"
               "  torchrun --nproc-per-node 8 -m gendistill distill paper.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (teacher, student, data, stages)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value: STAGE.key (one stage), *.key (every stage) or key[.sub] (top level); "
                        "VALUE is read as YAML. Repeatable.")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its newest intact checkpoint; refused if anything a "
                        "finished or started stage depends on changed")
    p.add_argument("--from-stage", metavar="N",
                   help="keep the run's stages before N (number or name; they must be unchanged), retrain N and "
                        "every later stage with the recipe as it is now")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the existing output directory first (only one gendistill created)")
    p.add_argument("--allow-code", action="store_true",
                   help="let the recipe run code it names ('module:function' factories and eval hooks); recipes "
                        "are data otherwise")
    p.add_argument("--check", action="store_true",
                   help="validate the recipe and print the plan (and any code it names, not imported without "
                        "--allow-code); write nothing")
    p.add_argument("--estimate", choices=("auto", "calibrate", "table", "none"), default="auto",
                   help="with --check: each stage's wall time on this device from a committed bench table "
                        "(bench/results/<gpu>/kd_step.json) where a row matches, else from a short calibration "
                        "(two steps of one micro-batch per stage on random tokens; auto calibrates only when the "
                        "models are local, never downloading them)")
    p.add_argument("--estimate-table", type=Path, metavar="JSON",
                   help="a bench/kd_step.py result to estimate from (default: the repository's for this GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    return p


def main(args) -> int:
    from gendistill.distill.recipe import load_recipe

    from gendistill.distill.recipe import code_entries, untrusted_code
    from gendistill.io import UserError

    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    if args.check:  # the plan lists code entries; they are imported (checked) only with --allow-code
        recipe = load_recipe(args.recipe, overrides, allow_code=True, import_code=args.allow_code)
    else:
        recipe = load_recipe(args.recipe, overrides, allow_code=args.allow_code)
    if args.check:
        from gendistill.distill.trainer import total_steps

        print(f"recipe {recipe.name}: teacher {recipe.teacher}, {recipe.trained} {recipe.student}, "
              f"out_dir {recipe.out_dir}")
        if "convert" in recipe.student:
            print(f"  0. convert: the teacher -> Hybrid-KDA student {recipe.student['convert'] or {}} -> "
                  f"{recipe.out_dir}/convert/model")
        for i, s in enumerate(recipe.stages, 1):
            steps = total_steps(s)
            print(f"  {i}. {s.name}: {s.objective} on {s.data} ({s.loss_mask}); train {s.train}; "
                  f"{'at least ' if s.count == 'scored' else ''}{steps} steps x {s.batch_size} x {s.seq_len} = "
                  f"{steps * s.batch_size * s.seq_len:,} tokens"
                  f"{f' (budget: {s.tokens:,} scored tokens)' if s.count == 'scored' else ''}; "
                  f"lr {s.lr} {s.schedule}")
        refused = dict(untrusted_code(recipe))
        for where, spec in code_entries(recipe):
            print(f"  code: {where} = {spec} ({'needs --allow-code' if where in refused else 'built in'}"
                  f"{'' if args.allow_code or where not in refused else ', not imported'})")
        if refused and not args.allow_code:
            raise UserError(f"the recipe names code to run ({', '.join(refused)}); a run needs --allow-code")
        print_estimate(recipe, args.estimate, args.estimate_table)
        return 0
    from gendistill.distill.trainer import run_recipe
    from gendistill.kernels.cache import configure_for_cuda, describe

    kernels = configure_for_cuda()  # before fla's first import: where compiled kernels and autotuning results go
    if os.environ.get("RANK", "0") == "0":
        print(describe(kernels), file=sys.stderr, flush=True)
    summary = run_recipe(recipe, resume=args.resume, overwrite=args.overwrite, from_stage=args.from_stage)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({"out_dir": summary["out_dir"], "final_model": summary["final_model"],
                          "stages": [{"name": s["stage"], "final_loss": (s.get("final") or {}).get("loss")}
                                     for s in summary["stages"]]}, indent=2))
    from gendistill.distill.parallel import shutdown

    shutdown()
    return 0


def _local(spec) -> tuple[bool, str]:
    """Whether a recipe model spec can be built without downloading (a hub id is local if the HF cache holds it)."""
    if not isinstance(spec, dict) or "path" not in spec:
        return True, ""
    path = spec["path"]
    if Path(path).expanduser().exists():
        return True, ""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json")
    except Exception:  # not a repo id, or no cache
        found = None
    return isinstance(found, str), f"{path} is neither a local directory nor in the Hugging Face cache"


def repo_table(device_name: str) -> Path | None:
    """The repository's committed bench/kd_step.py result for this GPU (bench/results/<gpu>/kd_step[_xN].json)."""
    import re

    gpu = re.sub(r"[^a-z0-9]+", "-", device_name.lower().replace("nvidia", "")).strip("-")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    path = Path(__file__).resolve().parents[2] / "bench" / "results" / gpu / \
        ("kd_step.json" if world == 1 else f"kd_step_x{world}.json")
    return path if path.exists() else None


def print_estimate(recipe, mode: str, table: Path | None) -> None:
    """`--check`'s bill: each stage's and the total wall time on this device (see `throughput.estimate_stages`)."""
    if mode == "none":
        return
    import torch

    from gendistill.distill import parallel
    from gendistill.distill.throughput import estimate_stages, format_duration
    from gendistill.distill.trainer import load_model
    from gendistill.kernels.cache import configure_for_cuda, describe

    env = parallel.setup()
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    print(describe(configure_for_cuda()))
    table = table or (repo_table(device_name) if env.device.type == "cuda" else None)
    if mode == "table" and table is None:
        print(f"estimate: no bench table for {device_name} (bench/results/<gpu>/kd_step.json); use --estimate "
              "calibrate")
        return
    missing = [why for spec in (recipe.teacher, recipe.student) for ok, why in [_local(spec)] if not ok]
    if missing and mode != "calibrate":
        print(f"estimate: not calibrated ({'; '.join(missing)}; --estimate calibrate downloads and measures)")
        if table is None:
            return
    try:
        teacher = load_model(recipe.teacher, role="teacher") if recipe.teacher is not None else None
        student = load_model(recipe.student, teacher=teacher, role="student")
    except Exception as err:  # an unreachable hub id, a bad factory: --check still validated the recipe
        print(f"estimate: the models could not be built ({type(err).__name__}: {err})")
        return
    try:  # the recipe is valid (checked above); an estimate that cannot be made is reported, not fatal
        rows = estimate_stages(recipe, teacher, student, env, device_name, table=table,
                               calibrate=mode != "table" and not missing)
    except Exception as err:
        print(f"estimate: the calibration failed ({type(err).__name__}: {err})")
        return
    where = f"{env.world} x {device_name}"
    print(f"estimate on {where} (per stage: seconds per optimiser step x steps):")
    total, complete = 0.0, True
    for i, r in enumerate(rows, 1):
        if r.get("seconds") is None:
            complete = False
            print(f"  {i}. {r['stage']}: no estimate (no matching table row)")
            continue
        total += r["seconds"]
        first = f"; first step {r['first_step_s']:.1f} s" if r.get("first_step_s") is not None else ""
        print(f"  {i}. {r['stage']}: {'at least ' if r['scored_budget'] else ''}{r['steps']} steps x "
              f"{r['step_s']:.3g} s = {format_duration(r['seconds'])} ({r['tokens_per_s']:,.0f} tokens/s; "
              f"{r['source']}{first})")
    print(f"  total: {'at least ' if not complete else ''}{format_duration(total)}"
          + ("" if complete else " (stages without an estimate left out)"))
