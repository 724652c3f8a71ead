"""Where prefill and decode time goes: CUDA kernel time per category, launches, and the top kernels, teacher vs
student.

    python bench/kernel_profile.py --contexts 4k,128k --decode 32k@16 --out bench/results/h200/kernel_profile.json

Prefill: one profiled forward per (model, context) -- the teacher, the same teacher with the student's fused
kernels (`teacher+fused`: how much of the student's lead is kernels, not architecture), the student -- after a
warm-up (fla autotunes there), no cache, last-token logits, as `gendistill bench` times it. Decode
(`--decode CONTEXT@BATCH`): one profiled greedy step from the synthetic cache `gendistill bench` decodes from, per
model and cache class (DynamicCache, StaticCache).
`wall_ms` is the CUDA-event time of the call (timed apart from the profiled one); `kernel_ms` the summed kernel
time, `busy_ms` the time any kernel ran: a wall time well above it means the GPU waits on the host (launch overhead,
syncs). Categories and the breakdown: bench/profiling.py.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment, print_table, write_result  # noqa: E402
from bench.profiling import CATEGORIES, attribute, kernel_events, top_host_ops  # noqa: E402
from gendistill.bench.measure import fast_path, random_ids, synthetic_cache, timed  # noqa: E402
from gendistill.io import parse_size  # noqa: E402
from gendistill.testing import random_teacher_and_student  # noqa: E402
from gendistill.kernels import fuse as fuse_modules  # noqa: E402
from gendistill.kda import use_backend  # noqa: E402


def profile_call(forward, device) -> dict:
    forward()  # warm-up: autotuning, allocator
    _, seconds = timed(forward, device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    return {**attribute(kernel_events(prof, "cuda"), seconds, top=60), "top_host_ops": top_host_ops(prof)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3-0.6b", choices=["qwen3-0.6b", "tiny"])
    p.add_argument("--contexts", default="4k,128k")
    p.add_argument("--decode", help="CONTEXT@BATCH, e.g. 32k@32: also profile one decode step there")
    p.add_argument("--out", default="bench/results/kernel_profile.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    pair = random_teacher_and_student(args.shape, 0)
    teacher, student = (m.to(device=device, dtype=torch.bfloat16).eval() for m in pair)
    # The stock teacher with the student's fused kernels (gendistill.kernels): what the kernels alone are worth.
    fused_teacher = fuse_modules(copy.deepcopy(teacher))
    rows, results = [], []

    def add(name, what, r):
        results.append({"model": name, "what": what, **r})
        rows.append({"model": name, "what": what, "wall_ms": r["wall_ms"], "kernel_ms": r["kernel_ms"],
                     "launches": r["launches"], **{k: v["ms"] for k, v in r["categories"].items()}})
        print(f"{name} {what}: wall {r['wall_ms']:.4g} ms, kernels {r['kernel_ms']:.4g} ms; top kernels", flush=True)
        print_table(r["top_kernels"][:10], ["name", "launches", "ms"])

    with torch.no_grad(), use_backend(fast_path(device)):
        for context in [parse_size(c, "--contexts") for c in args.contexts.split(",")]:
            ids = random_ids(teacher, 1, context, seed=0)
            for name, model in (("teacher", teacher), ("teacher+fused", fused_teacher), ("student", student)):
                forward = lambda: model(ids, use_cache=False, logits_to_keep=1).logits
                add(name, f"prefill {context}", profile_call(forward, device))
        if args.decode:
            context, batch = args.decode.split("@")
            context, batch = parse_size(context, "--decode"), int(batch)
            for cache_class, static in (("dynamic", False), ("static", True)):
                for name, model in (("teacher", teacher), ("student", student)):
                    cache = synthetic_cache(model, batch, context, max_len=context + 8 if static else None)
                    token = random_ids(model, batch, 1, seed=0)
                    step = lambda: model(token, past_key_values=cache, use_cache=True).logits
                    add(name, f"decode {context}@{batch} {cache_class}", profile_call(step, device))
                    del cache
                    torch.cuda.empty_cache()
    columns = ["model", "what", "wall_ms", "kernel_ms", "launches", *[c for c, _ in CATEGORIES], "other"]
    print_table(rows, columns)
    write_result(args.out, {"benchmark": "bench/kernel_profile.py", **environment(), "profiles": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
