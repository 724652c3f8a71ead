"""Where a profiled call's time goes: kernel time by category, the device's busy time (the union of its kernels'
intervals), the top kernels and host ops; and, for training steps with a known model-FLOP count and peak, MFU taken
apart into the three factors that hold it back:

    MFU = busy / wall  x  gemm / busy  x  model FLOPs / (gemm x peak)
          (the device    (the share of     (how fast the GEMMs run, as if every model FLOP were a GEMM FLOP: an upper
           waits on the   busy time in      bound on the GEMMs' own utilisation, since attention and the linear
           host)          GEMMs)            mixers' FLOPs run in other kernels)

On CUDA the "kernels" are the profiler's CUDA events; on a CPU (the tests' smoke runs) the outermost aten operators,
which run one at a time as kernels do.
"""
from __future__ import annotations

import re
from collections import defaultdict

# First match wins; names are lower-cased kernel (or operator) names.
CATEGORIES = [
    ("kda_kernels", r"kda|gated_delta|delta_rule|wy_|solve_tril|chunk_local_cumsum|l2norm|gla|chunk_fwd|chunk_bwd"),
    ("short_conv", r"conv"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|aten::(mm|addmm|bmm|linear)$"),
    ("loss", r"softmax|cross_entropy|nll_loss|kl_div|liger|jsd"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("collectives", r"nccl|all_reduce|allgather|reduce_scatter"),
    ("norm_gate", r"norm|softplus|sigmoid|silu|swiglu"),
    ("copies", r"copy|cat_|catarray|index|gather|fill|transpose|repeat|aten::cat$|aten::to$|contiguous"),
    ("elementwise", r"elementwise|vectorized|reduce|aten::(add|mul|sub|div|exp|pow|sum|mean)_?$"),
]


def category(name: str) -> str:
    lowered = name.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def _outermost_aten(event) -> bool:
    """An aten operator not inside another (aten::linear, not the addmm inside it): what a CPU runs as a unit."""
    parent = event.cpu_parent
    return event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))


def kernel_events(prof, device_type: str) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every kernel the profiler recorded (CPU: every outermost aten operator)."""
    from torch.autograd import DeviceType

    events = []
    for e in prof.events():
        if device_type == "cuda":
            keep = e.device_type == DeviceType.CUDA
        else:
            keep = e.device_type == DeviceType.CPU and _outermost_aten(e)
        if keep and e.time_range.elapsed_us() > 0:
            events.append((e.name, float(e.time_range.start), float(e.time_range.end)))
    return events


# The trainer's record_function ranges (gendistill/distill/trainer.py); on CUDA the backward runs on autograd's own
# thread, outside any range of the training loop's: its operators are found by autograd's name instead.
PHASES = {"gendistill.teacher": "teacher forward", "gendistill.student": "student forward + loss",
          "gendistill.backward": "backward", "gendistill.optimizer": "optimizer"}


def _phase(event) -> str:
    while event is not None:
        if event.name in PHASES:
            return PHASES[event.name]
        if event.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        event = event.cpu_parent
    return "other"


def phase_ms(prof, device_type: str, steps: int = 1) -> dict[str, float]:
    """Kernel time per step in each phase of the training step: each kernel goes to the phase of the operator that
    launched it (CPU: each outermost operator, as in `kernel_events`)."""
    from torch.autograd import DeviceType

    out: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        if device_type == "cuda":
            us = sum(k.duration for k in e.kernels)
        else:
            us = e.time_range.elapsed_us() if _outermost_aten(e) else 0
        if us > 0:
            out[_phase(e)] += us / 1e3 / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def top_host_ops(prof, n: int = 25) -> list[dict]:
    """Where the host's time goes (a host-bound step is fixed there, not in the kernels)."""
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    return [{"name": e.key[:120], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in host[:n]]


def union_us(intervals) -> float:
    """Length of the union of [start, end) intervals: the time at least one kernel ran (streams may overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def attribute(kernels: list[tuple[str, float, float]], wall_s: float, steps: int = 1,
              model_flops_per_step: float | None = None, peak_tflops: float | None = None, top: int = 25) -> dict:
    """Per-step breakdown of `steps` profiled steps that took `wall_s` in all (see the module docstring)."""
    by_category, by_name = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [0, 0.0])
    for name, start, end in kernels:
        for table, key in ((by_category, category(name)), (by_name, name)):
            table[key][0] += 1
            table[key][1] += (end - start) / 1e3
    wall_ms = 1e3 * wall_s / steps
    busy_ms = union_us((s, e) for _, s, e in kernels) / 1e3 / steps
    kernel_ms = sum(ms for _, ms in by_category.values()) / steps
    result = {
        "steps": steps, "wall_ms": wall_ms, "busy_ms": busy_ms, "idle_ms": max(0.0, wall_ms - busy_ms),
        "busy_fraction": busy_ms / wall_ms, "kernel_ms": kernel_ms, "launches": len(kernels) / steps,
        "categories": {k: {"launches": n / steps, "ms": ms / steps, "share_of_busy": ms / steps / busy_ms}
                       for k, (n, ms) in sorted(by_category.items(), key=lambda kv: -kv[1][1])},
        "top_kernels": [{"name": k[:120], "category": category(k), "launches": n / steps, "ms": ms / steps}
                        for k, (n, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]],
    }
    gemm_ms = result["categories"].get("gemm", {}).get("ms", 0.0)
    if model_flops_per_step and peak_tflops and gemm_ms > 0:
        gemm_rate = model_flops_per_step / (gemm_ms / 1e3) / (peak_tflops * 1e12)
        result["mfu_factors"] = {
            "busy_fraction": result["busy_fraction"], "gemm_share_of_busy": gemm_ms / busy_ms,
            "gemm_rate_over_peak": gemm_rate,
            "mfu": model_flops_per_step / (wall_ms / 1e3) / (peak_tflops * 1e12),
        }
    return result


def holds_back(result: dict) -> str:
    """One line: where the step's time goes beyond the GEMMs, largest first."""
    parts = [f"idle {result['idle_ms']:.1f} ms ({1 - result['busy_fraction']:.0%} of the step)"]
    parts += [f"{k} {v['ms']:.1f} ms ({v['share_of_busy']:.0%} of busy)"
              for k, v in result["categories"].items() if k != "gemm"][:5]
    factors = result.get("mfu_factors")
    head = "" if not factors else (
        f"MFU {factors['mfu']:.1%} = busy {factors['busy_fraction']:.0%} x GEMM share "
        f"{factors['gemm_share_of_busy']:.0%} x GEMM rate {factors['gemm_rate_over_peak']:.0%} of peak; ")
    phases = result.get("phases_ms")
    tail = "" if not phases else "; kernel time by phase: " + ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items())
    return head + "besides the GEMMs: " + ", ".join(parts) + tail
