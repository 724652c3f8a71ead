"""`gendistill distill RECIPE.yaml [--set stage.key=value ...] [--resume | --from-stage N | --overwrite] [--check]
[--allow-code]`

Several processes: `torchrun --nproc-per-node N -m gendistill distill RECIPE.yaml` (FSDP2, or `--set parallel=ddp`).
"""
from __future__ import annotations

import argparse
import json


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
        return 0
    from gendistill.distill.trainer import run_recipe

    summary = run_recipe(recipe, resume=args.resume, overwrite=args.overwrite, from_stage=args.from_stage)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({"out_dir": summary["out_dir"], "final_model": summary["final_model"],
                          "stages": [{"name": s["stage"], "final_loss": (s.get("final") or {}).get("loss")}
                                     for s in summary["stages"]]}, indent=2))
    from gendistill.distill.parallel import shutdown

    shutdown()
    return 0
