"""`gendistill eval`: score models by log-likelihood and by generation, write an eval directory and its report."""
from __future__ import annotations

import argparse
from pathlib import Path

from gendistill.evaluation.engine import Sampling
from gendistill.io import UserError


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None


def _named(text: str) -> tuple[str | None, str]:
    """'name=DIR' -> (name, DIR); 'DIR' -> (None, DIR): the name defaults to the directory's name."""
    name, sep, path = text.partition("=")
    if sep and name and path and "/" not in name:
        return name, path
    return None, text


def _group(text: str) -> tuple[str, str]:
    name, sep, axis = text.partition("=")
    if not (sep and name and axis):
        raise argparse.ArgumentTypeError(f"--group takes MODEL=GROUP (e.g. s1=ratio), got {text!r}")
    return name, axis


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR", type=_named,
                   help="model directory to evaluate, optionally named (default name: the directory's name); "
                        "repeat for several students")
    p.add_argument("--teacher", metavar="[NAME=]DIR", type=_named,
                   help="teacher directory: retention is student / teacher")
    p.add_argument("--group", action="append", default=[], metavar="MODEL=GROUP", type=_group,
                   help="put student MODEL in group GROUP (an ablation axis, e.g. ratio or recipe): the report ranks "
                        "students only within a group (default: one group); repeat per student")
    p.add_argument("--run", metavar="DIR", help="the distillation run the students come from (its */metrics.jsonl "
                                                "become the report's training curves)")
    p.add_argument("--tasks", required=True, metavar="TASKS",
                   help="comma-separated task YAML files or directories, recall tasks with lengths, lm-eval tasks "
                        "(lm-eval:NAME: a task, group or tag of lm-eval's registry or --lm-eval-include folders, "
                        "scored both ways on the same items) and `paper` (the paper's suite, docs/EVAL.md), e.g. "
                        "tasks/,niah_single@1k,4k,assoc_recall@2k,lm-eval:arc_challenge,lm-eval:mmlu")
    p.add_argument("--out", default="runs/eval", metavar="OUT", help="eval directory to write (default: runs/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAML files for lm-eval:NAME (repeatable; lm-eval's --include_path)")
    p.add_argument("--lm-eval-no-chat", action="store_true",
                   help="do not apply the chat template to lm-eval tasks (default: apply when the tokenizer has one, "
                        "as the paper)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run code benchmarks (lm-eval:humaneval, in `paper`): model-written programs execute in a "
                        "sandboxed subprocess (no network, temp dir, rlimits, time limit); without it they are refused")
    p.add_argument("--lm-eval", default="", metavar="TASKS",
                   help="also run lm-eval's own harness on these comma-separated tasks (names or YAML files): a raw "
                        "cross-check table beside the report; for item-paired two-way scores use --tasks lm-eval:NAME")
    p.add_argument("--lm-eval-limit", type=int, help="items per task of --lm-eval")
    p.add_argument("--decode", choices=("greedy", "sample", "both"), default="greedy",
                   help="generation: greedy (default), sampling averaged over --seeds, or both")
    p.add_argument("--seeds", type=_seeds, default=[1, 2, 3], help="sampling seeds, averaged (default: 1,2,3)")
    p.add_argument("--temperature", type=float, default=Sampling.temperature,
                   help=f"sampling temperature (default: {Sampling.temperature}, Qwen3 non-thinking, as the paper)")
    p.add_argument("--top-p", type=float, default=Sampling.top_p, help=f"(default: {Sampling.top_p})")
    p.add_argument("--top-k", type=int, default=Sampling.top_k, help=f"(default: {Sampling.top_k})")
    p.add_argument("--batch-size", type=int, default=16, help="rows per batch (default: 16)")
    p.add_argument("--max-batch-tokens", type=int, default=1 << 16,
                   help="padded tokens per batch, so long prompts get smaller batches (default: 65536)")
    p.add_argument("--limit", type=int, help="items per task (quick looks)")
    p.add_argument("--recall-samples", type=int, default=20, help="items per recall task and length (default: 20)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="float32 (the paper's default), bfloat16 or float16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _failed(out: str) -> list[dict]:
    import json
    from pathlib import Path

    manifest = Path(out) / "manifest.json"
    return json.loads(manifest.read_text()).get("failed", []) if manifest.is_file() else []


def main(args: argparse.Namespace) -> int:
    from gendistill.evaluation.runner import evaluate

    if args.batch_size < 1 or args.recall_samples < 1:
        raise UserError("--batch-size and --recall-samples must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: items per task must be at least 1 (leave it out for all items)")
    if args.decode != "greedy" and not args.seeds:
        raise UserError("--decode sample needs at least one seed")
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("sampling needs --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0 (greedy: --decode greedy)")
    models = {}
    for name, path in args.model:
        if name in models:
            raise UserError(f"--model {name}={path}: the name {name!r} is already given to {models[name]}")
        models[name or _default_name(path, models)] = path
    teacher = None
    if args.teacher:
        name, path = args.teacher
        teacher = {name: path} if name else path
    report = evaluate(
        models, teacher=teacher, groups=dict(args.group), run=args.run, tasks=args.tasks, out=args.out,
        decode=args.decode, seeds=args.seeds, sampling=Sampling(args.temperature, args.top_p, args.top_k),
        batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, limit=args.limit,
        recall_samples=args.recall_samples,
        lm_eval_tasks=[t for t in args.lm_eval.split(",") if t.strip()], lm_eval_limit=args.lm_eval_limit,
        lm_eval_chat_template=False if args.lm_eval_no_chat else None, lm_eval_include=args.lm_eval_include,
        allow_code_execution=args.allow_code_execution, device=args.device, dtype=args.dtype,
        overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {args.out}/report.json, report.md, report.html")
    failed = report.get("failed") or _failed(args.out)
    for failure in failed:  # listed in the manifest's `failed`
        print(f"  ! {failure.get('model') or 'not run'}: {failure['task']}: {failure['error'][:200]}")
    for finding in report["findings"]:
        print(f"  - {finding}")
    return 0


def _default_name(path: str, taken: dict) -> str:
    """The directory's name, made unique with -2, -3 ... (two runs' final models are often both called 'model')."""
    base = Path(path).name or "student"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    return name
