"""`gendistill bench`: KV/state memory, time to first token (forward and `generate()`) and decode speed of a teacher
and its Hybrid-KDA student, scored against the targets in gendistill/bench/targets.py.

    gendistill bench --teacher DIR --student DIR --contexts 4k,16k,32k,64k,128k [--decode-context 32k] [--out OUT]
    gendistill bench --shape qwen3-0.6b ...   (random weights, the real shape, no download; --shape tiny for CPU tests)

Order of work, and why:
1. Correctness first (gendistill/bench/checks.py): if the student's fast path disagrees with its reference, nothing
   is timed: the command exits 1 and writes only `correctness.json`.
2. Prefill per context, batch 1 (gendistill/bench/measure.py): TTFT to the first token's logits (`logits_to_keep=1`)
   without a cache (pure prefill), with a `DynamicCache` being filled, through `model.generate(ids,
   max_new_tokens=1)` (what a user calls; at `--generate-contexts`), and (`--cuda-graphs`) replayed as a CUDA graph;
   peak device memory of each; the cache's bytes measured from its tensors beside `modeling.cache_bytes`.
3. Decode at `--decode-context` from a synthetic cache (random K/V and states of the exact shapes a prefill leaves:
   decode speed does not depend on their values), at batch 1, a few batches, and the largest batch that fits; a
   preallocated StaticCache by default (`--decode-cache dynamic`: transformers' DynamicCache, which copies all K/V
   at every step and so measures that copy as much as the models).
Writes bench.json (with the command, commit and versions), table.md and three PNGs (gendistill/bench/render.py).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from gendistill.bench.checks import WrongModelError
from gendistill.bench.render import format_table, write_plots
from gendistill.bench.run import environment, run_bench
from gendistill.io import UserError, atomic_dir, atomic_write_json, atomic_write_text, check_output_dir, parse_size
from gendistill.testing import SHAPES

# generate() is timed at these of --contexts unless --generate-contexts says otherwise (the targets' contexts)
DEFAULT_GENERATE_CONTEXTS = (4096, 32768, 131072)


def parse_sizes(text: str | None, option: str) -> list[int] | None:
    return None if text is None else [parse_size(t, option) for t in text.split(",") if t.strip()]


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="KV/state memory, time-to-first-token and decode speed of a "
                                "teacher and its Hybrid-KDA student; refuses to time a student whose fast path is wrong.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--shape", choices=SHAPES, help="random weights in this shape (no download); "
                        "the student is `convert` of the teacher")
    source.add_argument("--teacher", help="teacher checkpoint directory (with --student)")
    p.add_argument("--student", help="Hybrid-KDA student checkpoint directory (with --teacher)")
    p.add_argument("--contexts", default="4k,16k,32k,64k,128k", help="prefill context lengths; k is 1024 "
                   "(default %(default)s)")
    p.add_argument("--generate-contexts", help="those of --contexts at which `model.generate(ids, max_new_tokens=1)` "
                   "is timed too, or 'none' (default: those of 4k, 32k, 128k that --contexts holds)")
    p.add_argument("--decode-context", default="32k", help="context of the decode measurements (default %(default)s)")
    p.add_argument("--batch", help="decode batch sizes for the throughput curve, e.g. 1,8,32 (default: powers of two "
                   "below the largest batch that fits; batch 1 and the largest are always measured)")
    p.add_argument("--max-batch", type=int, help="cap of the largest decode batch (default 1024 on CUDA; on CPU, "
                   "where nothing is sized from memory, 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement, median reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement (fla autotunes here)")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps per timed repeat")
    p.add_argument("--decode-cache", choices=["dynamic", "static"], default="static",
                   help="cache class for decode: a preallocated StaticCache (K/V written in place, as serving engines "
                   "do) or DynamicCache (generate's default, which copies all K/V at every step; default "
                   "%(default)s)")
    p.add_argument("--cuda-graphs", action="store_true", help="also time each uncached prefill replayed as a CUDA "
                   "graph, and with --decode-cache static decode every step as one, both models (the kernels without "
                   "the host's launch overhead; checked against the eager steps first; CUDA only)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--rtol", type=float, help="tolerance on each KDA layer's relative L2 error, fast path vs "
                   "reference (default 5e-3 for float32, 5e-2 for 16-bit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default bench/results/<shape or 'custom'>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-plots", action="store_true", help="write bench.json and table.md only, no PNGs (as the "
                   "committed results in bench/results/ are kept)")
    return p


def main(args) -> int:
    if (args.teacher is None) != (args.student is None):
        raise UserError("--teacher and --student go together (or use --shape)")
    if min(args.repeats, args.decode_steps) < 1 or args.warmup < 0:
        raise UserError("--repeats and --decode-steps must be >= 1, --warmup >= 0")
    contexts, batches = parse_sizes(args.contexts, "--contexts"), parse_sizes(args.batch, "--batch")
    decode_context = parse_size(args.decode_context, "--decode-context")
    if args.generate_contexts is None:
        generate_contexts = [c for c in contexts if c in DEFAULT_GENERATE_CONTEXTS]
    elif args.generate_contexts.strip().lower() == "none":
        generate_contexts = []
    else:
        generate_contexts = parse_sizes(args.generate_contexts, "--generate-contexts")
        missing = [c for c in generate_contexts if c not in contexts]
        if missing:
            raise UserError(f"--generate-contexts {args.generate_contexts}: {missing} not among --contexts "
                            f"{args.contexts}; generate() is compared with the forward at the same length, so add "
                            "them to --contexts")
    out = check_output_dir(args.out or Path("bench/results") / (args.shape or "custom"), args.overwrite)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available")
    if args.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device (the device is {device}); drop the flag on this machine")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)

    if args.shape:
        from gendistill.testing import random_teacher_and_student

        pair = random_teacher_and_student(args.shape, args.seed)
        teacher, student = (m.to(device=device, dtype=dtype).eval() for m in pair)
    else:
        from gendistill.loading import load_model
        from gendistill.modeling import HybridKDAForCausalLM

        teacher, student = (load_model(path, dtype=dtype, device=device, attn_implementation="sdpa", role=role)
                            for path, role in ((args.teacher, "teacher"), (args.student, "student")))
        if not isinstance(student, HybridKDAForCausalLM):
            raise UserError(f"--student {args.student} is a {type(student).__name__}, not a HybridKDAForCausalLM")
    for model in (teacher, student):
        model.config._attn_implementation = "sdpa"  # same attention backend for both, whatever was saved

    command = shlex.join(["gendistill", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else shlex.join(sys.argv)
    partial = out.with_name(out.name + ".partial.json")  # what a run cut short (time limit, crash) had measured

    def save_partial(measured: dict) -> None:
        atomic_write_json(partial, {"status": "partial", "command": command, "environment": environment(device),
                                    **measured})

    try:
        result = run_bench(teacher, student, contexts, decode_context=decode_context, batches=batches,
                           max_batch=args.max_batch, repeats=args.repeats, warmup=args.warmup,
                           decode_steps=args.decode_steps, rtol=args.rtol, seed=args.seed, on_progress=save_partial,
                           decode_cache=args.decode_cache, graphs=args.cuda_graphs,
                           generate_contexts=generate_contexts)
    except WrongModelError as err:
        with atomic_dir(out, overwrite=args.overwrite) as tmp:
            atomic_write_json(Path(tmp) / "correctness.json", {
                "status": "refused", "command": command, "arguments": vars(args),
                "environment": environment(device), "correctness": err.correctness})
        print(f"gendistill bench: {err}\nno speed figures written; see {out / 'correctness.json'}", file=sys.stderr)
        return 1
    result = {"status": "ok", "command": command, "arguments": vars(args), **result}
    table = format_table(result)
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        atomic_write_json(Path(tmp) / "bench.json", result)
        atomic_write_text(Path(tmp) / "table.md", table)
        plots = [] if args.no_plots else write_plots(result, Path(tmp))
    partial.unlink(missing_ok=True)
    print(table)
    print(f"wrote {out}/: " + ", ".join(["bench.json", "table.md", *plots]))
    return 0
