"""One bench run: check the student, then measure both models, then score the targets."""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

import gendistill
from gendistill.bench.checks import CHECK_TOKENS, WrongModelError, check_correctness
from gendistill.bench.measure import (BACKOFF, DECODE_MEMORY_FRACTION, DECODE_RESERVE_BYTES, LINEAR, MAX_REPEATS,
                                      MIN_TIMED_SECONDS, GiB, fast_path, layer_types, measure_decode,
                                      measure_prefill, release_memory, weight_bytes)
from gendistill.bench.render import fmt_context, fmt_value
from gendistill.bench.targets import compare_with_targets
from gendistill.io import UserError
from gendistill.kda import resolve_backend, use_backend


def describe_model(model) -> dict:
    types = layer_types(model.config)
    return {"class": type(model).__name__, "layers": len(types),
            "attention_layers": [i for i, t in enumerate(types) if t != LINEAR],
            "parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes(model),
            "dtype": str(model.dtype).removeprefix("torch."),
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def source_commit() -> str | None:
    """GENDISTILL_COMMIT where it is set (a copy of the tree on a rented GPU machine, whose .git may be missing or
    stale: bench/gpu.sh sets it), else the git commit of the code that ran (`+dirty` with uncommitted changes)."""
    if os.environ.get("GENDISTILL_COMMIT"):
        return os.environ["GENDISTILL_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = dirty = ""
    return commit + ("+dirty" if dirty else "") if commit else None


def environment(device: torch.device) -> dict:
    """Date, versions, commit and device of a measurement: every result file carries it."""
    def version(*names):
        for name in names:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(name)
        return None

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
           "triton": version("triton"), "fla": version("flash-linear-attention", "fla-core"),
           "gendistill": gendistill.__version__, "commit": source_commit(), "device": device.type,
           "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    return env


def run_bench(teacher, student, contexts: list[int], decode_context: int = 32768, batches: list[int] | None = None,
              max_batch: int | None = None, repeats: int = 5, warmup: int = 1, decode_steps: int = 16,
              rtol: float | None = None, seed: int = 0, on_progress=None, decode_cache: str = "static",
              graphs: bool = False, generate_contexts: list[int] = ()) -> dict:
    """Check the student, then measure both models. Raises WrongModelError before timing anything if the student's
    fast path or a cached decode disagrees with its reference. `batches`: decode batch sizes for the throughput
    curve (default powers of two below the largest that fits); `max_batch`: cap of the largest-batch search;
    `generate_contexts`: those of `contexts` at which `model.generate` is timed too.
    `on_progress(partial_result)` is called after every measurement, so a run cut short keeps what it measured."""
    device, dtype = student.device, student.dtype
    if teacher.device != device or teacher.dtype != dtype:
        raise UserError(f"teacher ({teacher.device}, {teacher.dtype}) and student ({device}, {dtype}) must share "
                        "device and dtype")
    max_batch = max_batch or (1024 if device.type == "cuda" else 4)
    graph_decode = graphs and decode_cache == "static"  # a DynamicCache reallocates K/V every step: not capturable
    models = {"teacher": teacher, "student": student}
    probe = torch.empty(1, device=device)
    with use_backend(fast_path(device)):
        kda_paths = {"prefill": resolve_backend(probe, CHECK_TOKENS), "decode": resolve_backend(probe, 1)}
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device, torch.no_grad():
        correctness = check_correctness(teacher, student, rtol, seed, graphs=graphs, decode_graphs=graph_decode)
        release_memory(device)
        if not correctness["passed"]:
            raise WrongModelError(correctness)
        print(f"correctness passed (KDA path: {kda_paths}); worst relative errors: " + ", ".join(
            f"{c['rel_err']:.2g} <= {c['rtol']:g}" for c in correctness["checks"]), flush=True)
        if device.type == "cuda" and kda_paths["prefill"] != "fla":
            print("warning: flash-linear-attention is not in use, the student runs the PyTorch chunk path", flush=True)
        with use_backend(fast_path(device)):
            prefill = []
            for context in contexts:
                prefill.append({"context": context, **measure_prefill(models, context, repeats, warmup, seed,
                                                                      graphs, context in generate_contexts)})
                if on_progress:
                    on_progress({"correctness": correctness, "prefill": prefill})
                print(f"prefill {fmt_context(context)}: " + ", ".join(
                    f"{name} {fmt_value('ms', prefill[-1][name].get('ttft_no_cache_ms'))}"
                    + (f" (generate() {fmt_value('ms', prefill[-1][name].get('ttft_generate_ms'))})"
                       if context in generate_contexts else "") for name in models), flush=True)
            decode = {}
            for name, model in models.items():
                decode[name] = measure_decode(model, decode_context, batches, max_batch, decode_steps, repeats,
                                              warmup, seed, static=decode_cache == "static", graphs=graph_decode)
                if on_progress:
                    on_progress({"correctness": correctness, "prefill": prefill, "decode": decode})
                print(f"decode {name} at {fmt_context(decode_context)}: " + (decode[name].get("error") or ", ".join(
                    f"batch {p['batch']} {p['tokens_per_s']:.4g} tok/s" for p in decode[name]["points"])), flush=True)
    return {
        "settings": {"dtype": str(dtype).removeprefix("torch."), "attention": "sdpa", "kda_backend": kda_paths,
                     "timer": "cuda events + synchronize" if device.type == "cuda" else "time.perf_counter (CPU: "
                     "only ratios are meaningful)", "repeats": repeats, "warmup": warmup, "statistic": "median",
                     "prefill_min_timed_seconds": MIN_TIMED_SECONDS, "prefill_max_repeats": MAX_REPEATS,
                     "prefill_batch": 1, "prefill_cuda_graphs": graphs,
                     "generate_contexts": list(generate_contexts), "decode_cuda_graphs": graph_decode,
                     "decode_context": decode_context, "decode_steps_per_repeat": decode_steps,
                     "decode_cache": f"{decode_cache}: synthetic (random values, exact shapes), " + (
                         "StaticCache preallocated, K/V written in place" if decode_cache == "static" else
                         "DynamicCache, K/V concatenated (copied) at every step"),
                     "peak_memory": "this model's weights + max_memory_allocated over the call's baseline",
                     "largest_batch": f"analytic bytes vs {DECODE_MEMORY_FRACTION:.0%} of free memory minus "
                     f"{DECODE_RESERVE_BYTES / GiB:g} GiB, backing off x{BACKOFF} on OOM, capped at {max_batch}"},
        "environment": environment(device),
        "models": {name: describe_model(model) for name, model in models.items()},
        "correctness": correctness,
        "prefill": prefill,
        "decode": decode,
        "targets": compare_with_targets(prefill, decode),
    }
