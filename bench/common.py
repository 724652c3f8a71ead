"""Shared helpers for the benchmark scripts: environment record, device timing, result files."""
from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


def environment() -> dict:
    """gendistill bench's environment record (versions, device, date) plus the command line."""
    from gendistill.bench import environment as bench_environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"command": " ".join(shlex.quote(a) for a in sys.argv), **bench_environment(device)}


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` after `warmup` calls; CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_result(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)
